"""A compact Tune progress callback: one line per logged step, per finished and per failed trial."""

from __future__ import annotations

import sys

from ray import tune


class Progress(tune.Callback):
    """Prints ``[rho0.80-s0] step 30  train 4.512  val 4.498  15.3k tok/s`` lines."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid = trial.config["trial"]["trial_id"]
        if result.get("done_record"):
            ep = result.get("epochs")
            line = (f"[{tid}] done: val {_f(result.get('val_loss'))} (best {_f(result.get('best_val_loss'))})"
                    f", {_f(result.get('tokens_per_s'), '.0f')} tok/s, epochs {_f(ep, '.3g')}")
            print(line, flush=True)
            if isinstance(ep, (int, float)) and ep > 1:
                print(f"WARNING [{tid}]: the token budget exceeds the training split ({ep:.2f} epochs)",
                      file=sys.stderr, flush=True)
            return
        parts = [f"[{tid}] step {result.get('step')}"]
        if "train_loss" in result:
            parts.append(f"train {_f(result['train_loss'])}")
        if "val_loss" in result:
            parts.append(f"val {_f(result['val_loss'])}")
        if "tokens_per_s" in result:
            parts.append(f"{result['tokens_per_s'] / 1e3:.1f}k tok/s")
        print("  ".join(parts), flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[{trial.config['trial']['trial_id']}] FAILED (see the summary)", flush=True)


def _f(v, fmt: str = ".4f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"
