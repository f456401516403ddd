#!/usr/bin/env bash
# One federated round on an emulated Raspberry Pi.
#
#   sudo scripts/emulated_pi.sh ROOT_DIR        e.g. /srv/edgekd-pi
#
# Raspberry Pi OS is Debian for arm64, so an arm64 Debian root run under qemu's user-mode
# emulation (binfmt_misc) stands in for the device's *software* (aarch64 wheels, no
# torch), not for its speed: emulated code runs roughly 10-50x slower than native. The
# script builds the root once, installs edgekd's torch-free device recipe in it, starts
# an edgekd server (SuperLink + ServerApp) on the host and an `edgekd client start
# --bundle` SuperNode inside the root, runs one round, and prints the outcome.
#
# Needs root (debootstrap, chroot, mount), the host venv with edgekd (HOST_VENV), a
# trained run (RUN: student.pt, teacher.pt, report.json) and access to the Debian
# mirror and the Python package registry. Not run by CI. Settings (environment):
#   HOST_VENV  host virtualenv with edgekd and torch     (/work/venv)
#   RUN        trained run folder                        (<repo>/runs/default)
#   WORK       scratch: wheel, bundle, node data, run    (/tmp/emupi)
#   PORT       the SuperLink's port on 127.0.0.1          (9292)
#   DATA       npz: the node reads train.npz from the bundle's data_dir (default);
#              partition: the node cuts its share of the demo data itself
#              (--partition-id 0 --num-partitions 2), which also installs mnist1d,
#              flwr-datasets and their dependencies (scipy, matplotlib, datasets,
#              pyarrow, ...) inside the root: heavier, still torch-free (not yet
#              tried end to end; the npz path is the one seen working).
#   MIRROR     Debian mirror                             (http://deb.debian.org/debian)
set -euo pipefail

ROOT=${1:?usage: $0 ROOT_DIR}
ROOT=$(realpath -m "$ROOT")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST_VENV=${HOST_VENV:-/work/venv}
RUN=${RUN:-$REPO/runs/default}
WORK=${WORK:-/tmp/emupi}
PORT=${PORT:-9292}
DATA=${DATA:-npz}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
EDGEKD="$HOST_VENV/bin/edgekd"
HOST_PY="$HOST_VENV/bin/python"

[[ $EUID -eq 0 ]] || { echo "run as root (debootstrap, chroot, mount)" >&2; exit 2; }
[[ $DATA == npz || $DATA == partition ]] || { echo "DATA must be npz or partition" >&2; exit 2; }
for f in student.pt teacher.pt report.json; do
    [[ -f $RUN/$f ]] || { echo "$RUN/$f missing (RUN=a trained run folder)" >&2; exit 2; }
done
mkdir -p "$WORK"
TIMES="$WORK/timings.txt"
: >"$TIMES"
step() { echo; echo "== $*"; }
# `timed NAME CMD...`: run CMD and append "NAME SECONDS" to $TIMES (the report's numbers).
timed() {
    local name=$1 start=$SECONDS
    shift
    "$@"
    echo "$name $((SECONDS - start))" | tee -a "$TIMES"
}
# Run a command inside the root with a clean environment (no host variables leaking in:
# the host's pip settings point at x86 wheel folders that do not exist there).
in_root() {
    chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
        PATH=/opt/edge/bin:/usr/local/bin:/usr/bin:/bin \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
        PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        "$@"
}

SERVER_PID="" CLIENT_PID="" MOUNTED_BINFMT=""
cleanup() {
    # Each side was started in its own session (setsid), so killing the process group
    # also ends the SuperLink / the SuperNode's flwr-clientapp children.
    for pid in $CLIENT_PID $SERVER_PID; do
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
    sleep 2
    for pid in $CLIENT_PID $SERVER_PID; do
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    if mountpoint -q "$ROOT/proc"; then umount "$ROOT/proc" || umount -l "$ROOT/proc"; fi
    if [[ -n $MOUNTED_BINFMT ]]; then umount /proc/sys/fs/binfmt_misc || true; fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- 1. host: emulation
step "qemu-user-static + binfmt_misc"
# The kernel runs foreign binaries through binfmt_misc; its filesystem is not mounted by
# default on this kind of machine (a container), so mount it first.
if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    MOUNTED_BINFMT=1  # unmounted again at exit (the handlers stay registered in the kernel)
fi
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
    || ! command -v update-binfmts >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y qemu-user-static debootstrap binfmt-support
fi
# Registered with flags "PF": the interpreter is opened at registration (F), so it also
# works inside the chroot without copying qemu into the root.
update-binfmts --enable qemu-aarch64 2>/dev/null || true
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
    || { echo "qemu-aarch64 binfmt handler is not enabled" >&2; exit 1; }

# ---------------------------------------------------------------- 2. the arm64 root
step "arm64 Debian root at $ROOT"
# Bookworm is what Raspberry Pi OS (64-bit) is based on; python3 there is 3.11, as on a
# Pi. Skipped when the root exists (minutes under emulation: the second stage runs
# arm64 maintainer scripts through qemu).
if [[ ! -x $ROOT/usr/bin/python3 ]]; then
    timed debootstrap debootstrap --arch=arm64 \
        --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$ROOT" "$MIRROR"
else
    echo "exists, debootstrap skipped"
fi
# The host's CA bundle: it is what lets pip reach the registry from this network (the
# root's own bundle may lack a site CA the host trusts).
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
# /proc is needed by Python and Flower (process handling). /sys is deliberately NOT
# bound: with it, onnxruntime's cpuinfo probing crashed qemu (SIGSEGV); without it
# onnxruntime only warns about cpuinfo and runs.
mountpoint -q "$ROOT/proc" || mount --bind /proc "$ROOT/proc"
in_root python3 -c 'import platform, sys; print("inside:", platform.machine(), sys.version.split()[0])'

# ---------------------------------------------------------------- 3. the device install
step "torch-free edgekd install in /opt/edge"
# edgekd from a wheel of this tree, without its (torch) dependencies, then the device
# recipe from pyproject's `edge` extra: numpy, onnxruntime, flwr (aarch64 wheels).
# flwr is pinned to the host's version so SuperLink and SuperNode speak the same API.
# Built from a copy of the tree (tracked and untracked, not ignored files), so the build
# leaves nothing in the checkout.
rm -rf "$WORK/wheel" "$WORK/src"
mkdir -p "$WORK/src"
git -C "$REPO" ls-files -z -co --exclude-standard | (cd "$REPO" && tar --null --ignore-failed-read -T - -cf -) \
    | tar -C "$WORK/src" -xf -
"$HOST_VENV/bin/pip" wheel --no-deps --no-build-isolation -q -w "$WORK/wheel" "$WORK/src"
WHEEL=$(ls "$WORK"/wheel/edgekd-*.whl)
FLWR_VERSION=$("$HOST_PY" -c 'import importlib.metadata as m; print(m.version("flwr"))')
mkdir -p "$ROOT/opt/wheels"
rm -f "$ROOT"/opt/wheels/edgekd-*.whl
cp "$WHEEL" "$ROOT/opt/wheels/"
PACKAGES=(numpy onnxruntime "flwr==$FLWR_VERSION")
[[ $DATA == partition ]] && PACKAGES+=(mnist1d flwr-datasets)
device_install() {
    [[ -x $ROOT/opt/edge/bin/python ]] || in_root python3 -m venv /opt/edge
    in_root /opt/edge/bin/pip install -q "${PACKAGES[@]}"
    in_root /opt/edge/bin/pip install -q --no-deps --force-reinstall "/opt/wheels/$(basename "$WHEEL")"
}
timed pip_inside device_install
# The device must stay torch-free: fail loudly if anything pulled torch in.
if in_root /opt/edge/bin/python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)'; then
    echo "torch got installed in the root: not a torch-free device install" >&2; exit 1
fi
in_root /opt/edge/bin/python -c '
import platform, importlib.metadata as m
print("platform.machine():", platform.machine())
for p in ("onnxruntime", "flwr", "numpy", "edgekd"): print(f"{p} {m.version(p)}")
' | tee "$WORK/inside.txt"

# ---------------------------------------------------------------- 4. bundle and data
step "bundle for 127.0.0.1:$PORT"
# The run's config: the server and the node data must use the run's data settings and
# model widths (the student checkpoint has the run's width).
mapfile -t RUN_SETS < <("$HOST_PY" - "$RUN/report.json" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))["config"]
for key, value in cfg.items():
    if key == "seed" or key.startswith("data.") or key in ("model.student-width", "model.teacher-width"):
        value = str(value).lower() if isinstance(value, bool) else value
        print(f"{key}={value}")
EOF
)
# A bundle of our own: client.toml carries the SuperLink address (the prebuilt one in
# RUN/bundles points at a documentation address). Built on the host (needs torch).
BUNDLE="$WORK/bundle"
"$EDGEKD" deploy build --model "$RUN/student.pt" --target raspberry-pi --out "$BUNDLE" \
    --superlink "127.0.0.1:$PORT" --run "$RUN" --force
rm -rf "$ROOT/opt/bundle"
cp -r "$BUNDLE" "$ROOT/opt/bundle"
CLIENT_ARGS=(--bundle /opt/bundle --superlink "127.0.0.1:$PORT" --insecure --port 9194)
if [[ $DATA == npz ]]; then
    # The device's own data, as a real Pi has it: partition 0 of 2 of the run's device
    # data, cut on the host and written where the bundle's client.toml looks
    # (data_dir = /opt/edgekd/data). read_device_data keeps the last 10 % for
    # validation, so the client_split validation share goes last.
    "$HOST_PY" - "$ROOT/opt/edgekd/data/train.npz" "${RUN_SETS[@]}" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from edgekd.core.config import EdgeKDConfig
from edgekd.core.data import client_split, load_federated_data
out, sets = Path(sys.argv[1]), dict(s.split("=", 1) for s in sys.argv[2:])
cfg = EdgeKDConfig().with_overrides(sets)
train, val = client_split(load_federated_data(cfg.data, cfg.seed), cfg.data.partition, 0, 2,
                          cfg.seed, cfg.data.val_fraction)
out.parent.mkdir(parents=True, exist_ok=True)
np.savez(out, x=np.concatenate([train.x, val.x]).astype(np.float32),
         y=np.concatenate([train.y, val.y]).astype(np.int64))
print(f"{out}: {len(train) + len(val)} samples, x {train.x.shape[1:]}")
EOF
else
    CLIENT_ARGS+=(--partition-id 0 --num-partitions 2)
fi

# ---------------------------------------------------------------- 5. the round
step "one round: server on the host, SuperNode in the root"
for p in "$PORT" 9194; do
    if ss -ltn "sport = :$p" | grep -q LISTEN; then echo "port $p is in use" >&2; exit 1; fi
done
RUN_OUT="$WORK/run"
rm -rf "$RUN_OUT" "$WORK/flwr-home"
SETS=()
for s in "${RUN_SETS[@]}"; do SETS+=(--set "$s"); done
# One round, the trained student and teacher (no teacher training, no server distillation),
# one node is enough, no evaluation round, and a long round timeout for emulated speed.
SETS+=(--set "model.student-path=$RUN/student.pt" --set "model.teacher-path=$RUN/teacher.pt"
       --set kd.server-distill-epochs=0 --set train.min-nodes=1 --set train.fraction-evaluate=0
       --set train.round-timeout=900)
start=$SECONDS
FLWR_HOME="$WORK/flwr-home" OMP_NUM_THREADS=1 setsid "$EDGEKD" server start --insecure \
    --listen "127.0.0.1:$PORT" --out "$RUN_OUT" --rounds 1 --app "$REPO" --timeout 1800 "${SETS[@]}" \
    >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
# The SuperNode retries until the SuperLink is up, so it can start right away. Its
# ClientApp runs as a flwr-clientapp subprocess, inside the root as well.
setsid chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/opt/edge/bin:/usr/bin:/bin \
    FLWR_HOME=/root/.flwr /opt/edge/bin/edgekd client start "${CLIENT_ARGS[@]}" \
    >"$WORK/client.log" 2>&1 &
CLIENT_PID=$!
echo "server pid $SERVER_PID (log $WORK/server.log), client pid $CLIENT_PID (log $WORK/client.log)"
set +e
wait "$SERVER_PID"
SERVER_RC=$?
set -e
echo "round $((SECONDS - start))" | tee -a "$TIMES"

# ---------------------------------------------------------------- 6. outcome
step "outcome"
tail -n 15 "$WORK/server.log"
echo "--- client log (tail)"
tail -n 15 "$WORK/client.log"
echo "---"
echo "server exit code: $SERVER_RC"
if [[ -f $RUN_OUT/report.json ]]; then
    "$HOST_PY" - "$RUN_OUT/report.json" <<'EOF'
import json, sys
rounds = json.load(open(sys.argv[1])).get("rounds", [])
for r in rounds:
    print("round record:", json.dumps(r)[:1500])
EOF
else
    echo "no $RUN_OUT/report.json"
fi
echo "timings (s):"; cat "$TIMES"
cat "$WORK/inside.txt"
exit "$SERVER_RC"
