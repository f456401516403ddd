"""The text files of a bundle: ``client.toml``, the systemd unit and the README for the
person at the device."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from edgekd.deploy.bundle.layout import (
    CLIENT_TOML,
    DEVICE_BUNDLE,
    DEVICE_ROOT,
    DEVICE_VENV,
    FEATURES,
    HEAD,
    HEAD_STEP,
    INFERENCE,
    PARITY_SAMPLES,
    README,
    REFERENCE,
    SERVICE,
    STEP_LAYOUT,
    TRAIN_INFER,
    TRAIN_STEP,
    _Artifact,
)
from edgekd.deploy.profiles import DeviceProfile

if TYPE_CHECKING:
    pass


# ------------------------------------------------------------------ text files
def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _text_files(
    profile: DeviceProfile,
    artifacts: list[_Artifact],
    superlink: str,
    data_dir: str,
) -> dict[str, str]:
    files = {
        CLIENT_TOML: _client_toml(profile, artifacts, superlink, data_dir),
        README: _readme(profile, artifacts, superlink),
    }
    if profile.backend != "litert":  # a phone has no systemd
        files[SERVICE] = _systemd_unit(profile)
    return files


def _client_toml(
    profile: DeviceProfile, artifacts: list[_Artifact], superlink: str, data_dir: str
) -> str:
    by_role = {a.role: a.name for a in artifacts if a.role}
    lines = [
        "# edgekd client configuration, written by `edgekd deploy build`.",
        "# `edgekd client start --bundle DIR` reads it; file names are relative to DIR.",
        "[client]",
        f"superlink = {_toml_string(superlink)}  # the SuperLink's Fleet API, HOST:PORT",
        f"profile = {_toml_string(profile.name)}",
        f"backend = {_toml_string(profile.backend)}",
        f"device = {_toml_string(profile.device)}",
        f"threads = {profile.threads}",
        f"model = {_toml_string(by_role[INFERENCE])}  # inference",
    ]
    if REFERENCE in by_role:
        lines.append(f"reference_model = {_toml_string(by_role[REFERENCE])}  # FP32 export")
    if TRAIN_STEP in by_role:
        lines.append(
            f"train_step = {_toml_string(by_role[TRAIN_STEP])}  # KD step of the whole student"
        )
        if TRAIN_INFER in by_role:
            lines.append(
                f"train_infer = {_toml_string(by_role[TRAIN_INFER])}  # logits, weights as inputs"
            )
        lines.append(f"step_layout = {_toml_string(STEP_LAYOUT)}  # the step graph's inputs")
    if FEATURES in by_role:
        lines += [
            f"features = {_toml_string(by_role[FEATURES])}  # frozen feature extractor",
            f"head_step = {_toml_string(by_role[HEAD_STEP])}  # one KD SGD step of the head",
            f"head = {_toml_string(HEAD)}  # initial head weights: weight [C, D], bias [C]",
        ]
    lines += [
        f"train_batch_size = {profile.training_batch_size}",
        f"data_dir = {_toml_string(data_dir)}  # this device's local data",
        "# TLS: PEM file of the CA that signed the SuperLink's certificate. Empty: an",
        "# insecure connection (for a test network only).",
        'root_certificates = ""',
        "# Node authentication: this node's private key (its public key registered with",
        "# the SuperLink). Empty: no node authentication.",
        'node_key = ""',
        "",
    ]
    return "\n".join(lines)


def _systemd_unit(profile: DeviceProfile) -> str:
    return f"""\
# systemd unit for the edgekd client on a {profile.name}; install it with
#   sudo cp {DEVICE_BUNDLE}/{SERVICE} /etc/systemd/system/
#   sudo systemctl daemon-reload && sudo systemctl enable --now {SERVICE.removesuffix(".service")}
[Unit]
Description=edgekd federated KD client ({profile.name})
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=edgekd
WorkingDirectory={DEVICE_ROOT}
Environment=OMP_NUM_THREADS={profile.threads}
ExecStart={DEVICE_VENV}/bin/edgekd client start --bundle {DEVICE_BUNDLE}
Restart=on-failure
RestartSec=10
# stdout/stderr go to the journal: journalctl -u {SERVICE.removesuffix(".service")} -f
StandardOutput=journal
StandardError=journal

[Install]
WantedBy=multi-user.target
"""


def _install_commands(profile: DeviceProfile) -> str:
    from edgekd import __version__

    if profile.backend == "torch":
        return (
            f"python3 -m venv --system-site-packages {DEVICE_VENV}   # keeps JetPack's CUDA torch\n"
            f"{DEVICE_VENV}/bin/pip install 'edgekd=={__version__}'"
        )
    runtime = "onnxruntime" if profile.backend == "onnxruntime" else "ai-edge-litert"
    return (
        f"python3 -m venv {DEVICE_VENV}\n"
        f"# edgekd itself without its server-side dependencies (torch, Ray), then the\n"
        f"# device runtime: nothing here installs torch. pip warns that edgekd's torch\n"
        f"# requirement is not met; the device never imports torch. A wheel built on\n"
        f"# the server (`pip wheel --no-deps .`) works in place of 'edgekd=={__version__}'.\n"
        f"{DEVICE_VENV}/bin/pip install --no-deps 'edgekd=={__version__}'\n"
        f"{DEVICE_VENV}/bin/pip install numpy flwr {runtime}"
    )


def _readme(profile: DeviceProfile, artifacts: list[_Artifact], superlink: str) -> str:
    model = next(a for a in artifacts if a.role == INFERENCE)
    service = SERVICE.removesuffix(".service")
    files = "\n".join(
        f"| `{a.name}` | {a.role or 'data'} | {a.precision or '-'} | {a.note} |" for a in artifacts
    )
    training = (
        "`train_step.tflite` (signatures `train`, `infer`)"
        if any(a.role == TRAIN_STEP for a in artifacts)
        else "`features.tflite` and `head_step.tflite` (signatures `train`, `infer`)"
    )
    if profile.backend == "litert":
        copy = (
            "adb push bundle /data/local/tmp/edgekd-bundle      # or copy it into the app\n"
            "# In a Linux userland on the phone (e.g. Termux) with Python >= 3.11:\n"
            "mkdir -p ~/edgekd && cp -r /data/local/tmp/edgekd-bundle ~/edgekd/bundle"
        )
        start = (
            "edgekd client start --bundle ~/edgekd/bundle\n"
            "```\n\n"
            "There is no Kotlin SuperNode: this Python LiteRT client is the reference. An app\n"
            f"embeds {training} with the LiteRT Android runtime and must speak Flower's\n"
            "Fleet API itself.\n\n"
            "Logs: the client prints to its terminal; run it under `nohup ... > client.log`\n"
            "to keep them.\n"
        )
        bundle = "~/edgekd/bundle"
    else:
        copy = (
            f"scp -r bundle USER@DEVICE:/tmp/edgekd-bundle\n"
            f"ssh USER@DEVICE\n"
            f"sudo useradd --system --home {DEVICE_ROOT} edgekd || true\n"
            f"sudo mkdir -p {DEVICE_ROOT} && sudo mv /tmp/edgekd-bundle {DEVICE_BUNDLE}"
        )
        start = (
            f"sudo cp {DEVICE_BUNDLE}/{SERVICE} /etc/systemd/system/\n"
            f"sudo systemctl daemon-reload\n"
            f"sudo systemctl enable --now {service}\n"
            "```\n\n"
            f"Logs go to the systemd journal: `journalctl -u {service} -f`;\n"
            f"status: `systemctl status {service}`; stop: `sudo systemctl stop {service}`.\n"
        )
        bundle = DEVICE_BUNDLE
    return f"""\
# edgekd bundle for {profile.name}

{profile.description}. The device serves predictions with `{model.name}`
({model.precision}, {profile.backend}) and joins the federation at `{superlink}`
(`client.toml`; edit `superlink`, `data_dir`, `root_certificates` and `node_key` there).

| file | role | precision | note |
|---|---|---|---|
{files}

`manifest.json` holds the sha256 of every file and the parity numbers measured when the
bundle was built; the client refuses a bundle whose files changed.

## 1. Copy

```bash
{copy}
```

## 2. Install

```bash
{_install_commands(profile)}
```

## 3. Check (on the device)

```bash
{DEVICE_VENV if profile.backend != "litert" else "~/edgekd/venv"}/bin/edgekd deploy check {bundle}
```

It verifies every file, re-runs parity on {PARITY_SAMPLES} stored test samples against the
FP32 torch logits and measures latency at batch 1; exit code 0 means the device is ready.

## 4. Start

```bash
{start}"""
