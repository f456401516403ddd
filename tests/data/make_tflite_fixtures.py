"""Regenerate the LiteRT fixtures of the on-device head training tests.

Needs litert-torch, which CI does not install (it is large), so the outputs are
committed. Run from the repository root with a venv that has it::

    python3 -m venv /work/venv-lite
    /work/venv-lite/bin/pip install -c constraints.txt -e . litert-torch
    OMP_NUM_THREADS=1 /work/venv-lite/bin/python tests/data/make_tflite_fixtures.py

Writes, next to this script, for the width-8 fixture student ``student_w8.pt``:

* ``features_w8_b32.tflite``: its frozen feature extractor, signature ``features``;
* ``head_step_d{D}_c{C}_b32.tflite``: the head step (``train``) and head logits
  (``infer``) for its ``head = Linear(D, C)``;
* ``student_w8_trained.pt``: the same student after 20 epochs of KD from a width-32
  teacher on the default data's public split (an untrained student's near-tied logits
  make INT8 flip too many predictions for a device profile's parity check);
* ``bundles/android-w8/``: an ``android`` device bundle of the trained one
  (`edgekd deploy build`), for the end-to-end test of LiteRT nodes
  (tests/integration/test_edge_nodes.py);
* ``train_steps/train_step_<family>_<optimizer>_b16.tflite``: the whole-student step
  (`edgekd.deploy.train_step`, signatures ``train`` and ``infer``) of every student in
  ``tests/deploy/step_models.py``, for Adam and SGD (``--steps`` writes only these;
  ``--bundle`` only the android bundle, from the committed trained student).
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgekd.deploy.bundle import build_bundle
from edgekd.deploy.head_step import split_student
from edgekd.deploy.tflite_export import export_features_tflite, export_head_step_tflite
from edgekd.learn.models import load_checkpoint

BATCH = 32  # the tests' static batch; the last short batch is padded


def train_student(source: Path, out: Path) -> None:
    """KD from a small teacher on the default data's public split, seeded."""
    import torch

    from edgekd.core.config import EdgeKDConfig
    from edgekd.core.data import load_federated_data
    from edgekd.learn.models import build_model, save_checkpoint, spec_for
    from edgekd.learn.training import KDSettings, kd_train, teacher_probs_for

    cfg = EdgeKDConfig()
    data = load_federated_data(cfg.data, cfg.seed)
    torch.manual_seed(0)
    teacher = build_model(spec_for(data.input_shape, data.num_classes, 32))
    kd_train(
        teacher,
        data.public.x,
        data.public.y,
        None,
        KDSettings(epochs=20, lr=3e-3, batch_size=64),
        num_classes=10,
        seed=0,
    )
    student, spec = load_checkpoint(str(source))
    probs = teacher_probs_for(teacher, data.public.x, 4.0)
    settings = KDSettings(epochs=20, lr=3e-3, batch_size=64, temperature=4.0, alpha=0.5)
    kd_train(student, data.public.x, data.public.y, probs, settings, num_classes=10, seed=0)
    save_checkpoint(student, spec, str(out))


def write_step_fixtures(here: Path) -> None:
    """The step graphs of the test students (weights are graph inputs: shapes only)."""
    from edgekd.deploy.tflite_export import export_train_step_tflite
    from edgekd.deploy.train_step import layout_for

    sys.path.insert(0, str(here.parent / "deploy"))
    from step_models import MODELS, NUM_CLASSES, TFLITE_BATCH, tflite_fixture_name

    folder = here / "train_steps"
    folder.mkdir(exist_ok=True)
    for family, make in MODELS.items():
        for optimizer in ("adam", "sgd"):
            model, shape = make()
            layout = layout_for(model, shape, NUM_CLASSES, optimizer)
            data = export_train_step_tflite(model, layout, TFLITE_BATCH)
            (folder / tflite_fixture_name(family, optimizer)).write_bytes(data)
            print(f"wrote {tflite_fixture_name(family, optimizer)} ({len(data)} bytes)")


def main() -> None:
    here = Path(__file__).resolve().parent
    if "--bundle" in sys.argv:
        return write_android_bundle(here)
    write_step_fixtures(here)
    if "--steps" in sys.argv:
        return
    model, spec = load_checkpoint(str(here / "student_w8.pt"))
    _, head = split_student(model)
    input_shape = (spec.in_channels, spec.input_size)
    outputs = {
        f"features_w8_b{BATCH}.tflite": export_features_tflite(model, input_shape, BATCH),
        f"head_step_d{head.in_features}_c{head.out_features}_b{BATCH}.tflite": (
            export_head_step_tflite(head.in_features, head.out_features, BATCH)
        ),
    }
    for name, data in outputs.items():
        (here / name).write_bytes(data)
        print(f"wrote {name} ({len(data)} bytes)")
    trained = here / "student_w8_trained.pt"
    train_student(here / "student_w8.pt", trained)
    print(f"wrote {trained.name}")
    write_android_bundle(here)


def write_android_bundle(here: Path) -> None:
    bundle = build_bundle(
        here / "student_w8_trained.pt",
        "android",
        here / "bundles" / "android-w8",
        superlink="127.0.0.1:9092",
        data_dir="data",
        force=True,
    )
    print(f"wrote {bundle}")


if __name__ == "__main__":
    main()
