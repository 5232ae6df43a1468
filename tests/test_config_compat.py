"""Config hashes are frozen: options added later must not change an existing config's hash.

A long experiment campaign resumes from committed results keyed by ``ModelConfig.hash()`` and the
trial's ``train_dict``. These values were computed before the OverEncoding, Muon and
hyper-connection options were added (commit 24f16f9). A failure here means a new field is missing
from ``config.LATE_FIELDS`` or its default does not reproduce the old behaviour; updating the
values is legitimate only if every committed result is re-keyed at the same time.
"""

import hashlib
import json

from engram_jax.allocation import allocate
from engram_jax.config import PRESETS, ModelConfig, TrainConfig, preset, train_dict

PRESET_HASHES = {
    "tiny": "d69c99f03450",
    "tiny-dense": "eea9dbd23130",
    "smoke": "ce4e411ae81a",
    "cpu-small": "007f19684af3",
    "cpu-1e12": "be7a0ccde5b6",
    "cpu-3e12": "b4802b5bf147",
    "cpu-1e13": "4ad186dab213",
    "gpu-s": "d079626344fc",
    "gpu-m": "3f9a753cd88f",
}
ALLOCATED_HASHES = {("cpu-small", 0.8): "3a21ffcfc694", ("cpu-1e12", 0.8): "28015ceb20c3",
                    ("cpu-3e12", 0.8): "a206f083b68a"}
DEFAULT_TRAIN_HASH = "5febdfcaa7bb"


def test_preset_hashes_unchanged():
    assert {k: v.hash() for k, v in PRESETS.items() if k in PRESET_HASHES} == PRESET_HASHES


def test_allocated_hashes_unchanged():
    for (name, rho), h in ALLOCATED_HASHES.items():
        assert allocate(preset(name), rho).hash() == h, name


def test_default_train_dict_unchanged():
    d = train_dict(TrainConfig())
    assert hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12] == DEFAULT_TRAIN_HASH


def test_old_dicts_load():
    """Dicts written before the new options (no such keys) load, and round-trip."""
    for cfg in [*PRESETS.values(), allocate(preset("cpu-small"), 0.8)]:
        d = json.loads(cfg.to_json())
        assert "overencoding" not in d
        assert ModelConfig.from_dict(d) == cfg
    t = train_dict(TrainConfig(lr=1e-3))
    assert "optimizer" not in t and "muon_lr_mult" not in t
    assert TrainConfig(**t) == TrainConfig(lr=1e-3)
