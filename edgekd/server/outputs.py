"""What a run reports and writes: the report blocks, the exported students (FP32 and
INT8 ONNX, the INT8 one checked against a device gate), and the fidelity summaries."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edgekd import __version__
from edgekd.core import records as R
from edgekd.core.config import EdgeKDConfig
from edgekd.core.data import FederatedData
from edgekd.core.numerics import softmax
from edgekd.deploy.onnx_export import export_onnx_bytes, sha256_hex
from edgekd.deploy.quantize import CALIBRATION_SAMPLES, int8_weight_fake_quant, quantize_onnx_int8
from edgekd.learn.compression import CompressionSchedule
from edgekd.learn.models import ModelSpec, count_params, save_checkpoint
from edgekd.learn.pruning import sparsity_of
from edgekd.learn.training import predict_logits
from edgekd.reporting.report import (
    dark_knowledge,
    model_summary,
    write_json_atomic,
    write_plots,
    write_rounds,
)
from edgekd.server.federation import report_accuracy
from edgekd.server.node_wire import Masks
from edgekd.server.phases import StudentStart, TeacherPhase

log = logging.getLogger("edgekd")
# The device profile whose parity gate `edgekd deploy build` applies to this export.
INT8_GATE_PROFILE = "raspberry-pi"


def model_block(model: nn.Module, data: FederatedData, teacher: TeacherPhase) -> dict[str, Any]:
    """A model's report block on the devices' test split (FP32 parameter bytes)."""
    probs = softmax(predict_logits(model, data.test.x))
    n = count_params(model)
    return model_summary(
        probs,
        data.test.y,
        data.num_classes,
        params=n,
        nbytes=4 * n,
        teacher_probs=teacher.test_probs,
    )


def run_report(
    cfg: EdgeKDConfig,
    data: FederatedData,
    teacher: TeacherPhase,
    start: StudentStart,
    student: nn.Module,
    rounds: list[dict[str, Any]],
    masks: Masks,
    schedule: CompressionSchedule,
) -> dict[str, Any]:
    """``report.json`` as far as the federation decides it (README: Outputs)."""
    return {
        "edgekd_version": __version__,
        "config": cfg.to_flat(),
        "dataset": {
            "name": cfg.data.dataset,
            "num_classes": data.num_classes,
            "input_shape": list(data.input_shape),
            "client_shift": cfg.data.client_shift,
            "partition": cfg.data.partition,
            "public": len(data.public),
            "server_test": len(data.server_test),
            "device_pool": len(data.pool),
            "test": len(data.test),
        },
        "teacher": {
            **model_block(teacher.model, data, teacher),
            "server_domain_accuracy": report_accuracy(teacher.server_probs, data.server_test.y),
            "onnx_sha256": sha256_hex(teacher.onnx),
            "onnx_bytes": len(teacher.onnx),
        },
        "student": {
            **model_block(student, data, teacher),
            "sparsity": sparsity_of(masks),
            "bits": schedule.bits,
            "structure": start.structure,
            "warm_start_accuracy": rounds[0].get("accuracy"),
            "dark_knowledge": dark_knowledge(
                softmax(predict_logits(student, data.test.x)), data.test.y, data.num_classes
            ),
        },
        "rounds": rounds,
        # client.backend: the accepted updates each runtime trained, over all rounds
        "updates_by_backend": {
            b: sum(int(r.get(f"updates_{b}", 0)) for r in rounds) for b in R.TRAIN_BACKENDS
        },
        # Against the student as it started: filter pruning and low-rank shrink it.
        "communication": communication(
            rounds, count_params(start.init), count_params(teacher.model)
        ),
    }


def write_exports(
    out_dir: Path,
    cfg: EdgeKDConfig,
    data: FederatedData,
    student: nn.Module,
    spec: ModelSpec,
    teacher: TeacherPhase,
    rounds: list[dict[str, Any]],
    baseline_rounds: list[dict[str, Any]] | None,
    report: dict[str, Any],
) -> None:
    """Checkpoints, rounds, plots, the ONNX and INT8 ONNX students (checked against the
    raspberry-pi gate into ``report["student_int8"]``), and ``report.json``."""
    save_checkpoint(student, spec, str(out_dir / "student.pt"))
    write_rounds(out_dir / "rounds.jsonl", rounds)
    write_plots(
        out_dir,
        rounds,
        softmax(predict_logits(student, data.test.x)),
        data.test.y,
        baseline_rounds,
    )
    save_checkpoint(int8_weight_fake_quant(student), spec, str(out_dir / "student.int8.pt"))
    student_onnx = export_onnx_bytes(student, data.input_shape)
    (out_dir / "student.onnx").write_bytes(student_onnx)
    int8_path = out_dir / "student.int8.onnx"
    int8_path.write_bytes(quantize_onnx_int8(student_onnx, data.public.x[:CALIBRATION_SAMPLES]))
    report["student_int8"] = check_int8_export(int8_path, student, data, teacher.test_probs)
    if not report["student_int8"]["ok"]:
        log.warning("INT8 export: %s", "; ".join(report["student_int8"]["problems"]))
    write_json_atomic(out_dir / "report.json", report)


def check_int8_export(
    int8_path: Path, student: nn.Module, data: FederatedData, teacher_test: np.ndarray
) -> dict[str, Any]:
    """The INT8 ONNX student scored on the devices' test split with this host's
    onnxruntime, against the FP32 student with `INT8_GATE_PROFILE`'s thresholds, so a
    run never leaves a broken INT8 student without saying so.

    The report block: the model summary, ``parity`` (`ParityResult`), ``problems`` (each
    missed threshold), ``ok`` and ``host`` (where it was measured, `int8_host`)."""
    from edgekd.deploy.host import int8_host
    from edgekd.deploy.parity import measure_parity, onnx_predictor, parity_problems
    from edgekd.deploy.profiles import load_profile

    logits = onnx_predictor(int8_path)(data.test.x)
    parity = measure_parity(
        logits,
        predict_logits(student, data.test.x),
        data.test.y,
        model_file=int8_path.name,
        precision="int8",
        runtime="onnxruntime",
    )
    problems = parity_problems(parity, load_profile(INT8_GATE_PROFILE))
    block = model_summary(
        softmax(logits),
        data.test.y,
        data.num_classes,
        params=count_params(student),
        nbytes=int8_path.stat().st_size,
        teacher_probs=teacher_test,
    )
    return {
        **block,
        "parity": parity.to_dict(),
        "profile": INT8_GATE_PROFILE,
        "problems": problems,
        "ok": not problems,
        "host": int8_host(),
    }


def communication(
    rounds: list[dict[str, Any]], student_params: int, teacher_params: int
) -> dict[str, int]:
    """Bytes actually sent, next to what plain FedAvg of the FP32 student (and of the
    teacher) would have sent to and from the same nodes in the same rounds: 4 bytes a
    parameter, one model per training or evaluation instruction and one per reply that
    carried a model."""
    transfers = sum(
        r["messages"] + r.get("eval_messages", 0) + r["replies"] - r["failures"] for r in rounds
    )
    return {
        "bytes_down": sum(r["bytes_down"] for r in rounds),
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "fp32_fedavg_bytes": 4 * student_params * transfers,
        "teacher_fedavg_bytes": 4 * teacher_params * transfers,
    }


def fidelity_summaries(out_dir: Path, cfg: EdgeKDConfig) -> dict[str, Any]:
    """`edgekd inspect` of the FP32 and the INT8 ONNX student, each into its own folder.

    A failure here is logged and recorded, never allowed to lose the finished run."""
    from edgekd.inspection import run_inspect, summarize

    out: dict[str, Any] = {}
    for name, student in (("fp32", "student.pt"), ("int8_onnx", "student.int8.onnx")):
        try:
            full = run_inspect(
                str(out_dir / "teacher.pt"),
                str(out_dir / student),
                dataset_cfg=cfg.data,
                seed=cfg.seed,
                out_dir=out_dir / f"fidelity-{name.replace('_', '-')}",
                compressed_path=str(out_dir / "student.int8.pt") if name == "fp32" else None,
            )
            out[name] = summarize(full)
        except Exception as exc:  # noqa: BLE001 - the run's results are already saved
            log.warning("fidelity report for %s failed: %s", student, exc)
            out[name] = {"error": str(exc)}
    return out
