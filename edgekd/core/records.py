"""Keys of the round protocol's records: one place, never string literals elsewhere.

Server → client: ``ARRAYS`` (the student), ``CONFIG`` (the keys below), and for the
two soft-target modes either ``TEACHER`` (the teacher as ONNX bytes, sent once per
node and cached there by hash) or ``PROXY`` (public inputs with teacher
probabilities). A continual node the server has no trained state for, asked in a later
task, also gets ``HISTORY`` (the global student at every task start) to rebuild its
method's state. Client → server: ``ARRAYS`` and ``METRICS``.
"""

# RecordDict entries
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
TEACHER = "teacher"
PROXY = "proxy"
PEER = "peer"  # a fleet: the widest class's student as ONNX (xz), for narrower classes' KD
HISTORY = "history"  # continual: the global student at the start of every task so far
MASKS = "masks"  # client-internal: the codec mod hands the decoded masks to the handler

# ArrayRecord entries
TEACHER_ONNX = "onnx"  # uint8 bytes of the teacher's ONNX model
PROXY_X = "x"
PROXY_PROBS = "probs"  # continual: teacher probabilities at continual.temperature
PROXY_LOGITS = "logits"  # KD proxy mode: teacher logits; each node softens them at its T(B)

# ConfigRecord entries (server → client)
ROUND = "server-round"  # injected by Flower's FedAvg
MODE = "mode"  # "kd" (edgekd) or "ce" (plain FedAvg baseline, no teacher)
LOCAL_EPOCHS = "local-epochs"
LR = "lr"
OPTIMIZER = "optimizer"
BATCH_SIZE = "batch-size"
CLIP_NORM = "clip-norm"
SEED = "seed"
TEMPERATURE = "kd.temperature"
ALPHA = "kd.alpha"
CLASS_WEIGHTING = "kd.class-weighting"
MAX_CLASS_WEIGHT = "kd.max-class-weight"
REFERENCE_BATCH = "kd.reference-batch"
SOFT_TARGETS = "kd.soft-targets"
AUGMENT = "augment"  # train.augment, applied by torch nodes
TRUST = "kd.trust"
TEACHER_HASH = "kd.teacher-hash"  # sha256 of the ONNX; it travels xz-compressed
PEER_WEIGHT = "fleet.peer-weight"  # the PEER student's share of the on-device KD logits
SHAPES = "compression.shapes"  # codec shape manifest (JSON): name -> [dtype, shape]
UPLOAD = "compression.upload"  # fp32 | int8-delta[-ef] | int4-delta[-ef]
ENTROPY = "compression.entropy"  # none | zlib: how the node packs its reply
STATE_VERSION = "compression.state-version"  # id of the INT8 state this message carries
BASE_VERSION = "compression.base-version"  # "" (full state) or the id the delta applies to
QAT = "compression.qat"  # "" | int8 | ternary: the quantizer to train with this round
MASK_VERSION = "compression.mask-version"  # "" or the masks' hash; cached per node
# Continual runs (edgekd.server.continual -> edgekd.client.continual_client)
CL_RUN = "continual.run"  # tag of one method's run; a node resets its continual state on a new tag
CL_METHOD = "continual.method"  # one of CONTINUAL_METHODS
CL_TASK = "continual.task"  # index of the task this round trains on, 0-based
CL_WEIGHT = "continual.weight"  # teacher-kd and lwf
CL_LWF_PROXY_WEIGHT = "continual.lwf-proxy-weight"
CL_TEMPERATURE = "continual.temperature"
CL_EWC_WEIGHT = "continual.ewc-weight"
CL_BUFFER_SIZE = "continual.buffer-size"
CL_MASK_UNSEEN = "continual.mask-unseen"  # CE over the classes seen so far only
CL_LOGIT_ADJUST = "continual.logit-adjust"  # CE(z + log local prior, y), no class weights
CL_PROXY_HASH = "continual.proxy-hash"  # sha256 of the proxy record, cached per node
# Fleet runs (edgekd.server.fleet_run): the query that asks a node for its device class,
# its answer, and the width of the student a class's messages carry.
FLEET_QUERY = "fleet.query"  # "class"
FLEET_CLASS = "fleet.class"  # the class's name as fleet.classes spells it
STUDENT_WIDTH = "model.student-width"

# MetricRecord entries (client → server)
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key
TRAIN_LOSS = "train-loss"
ACCURACY = "accuracy"
LOSS = "loss"
PENALTY = "penalty"  # continual: the anti-forgetting term of the last local epoch
# Optional training metric: which runtime trained the update ("updates-<backend>": 1).
# The server counts them per round (rounds.jsonl, report.json) and never averages them.
TRAIN_BACKENDS = ("torch", "onnxruntime", "litert")
BACKEND_METRICS: dict[str, str] = {b: f"updates-{b}" for b in TRAIN_BACKENDS}

# Node config (per SuperNode; set by the simulation engine or `--node-config`)
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
NODE_BATCH_SIZE = "batch-size"  # a device whose memory forces a smaller batch
FAULT = "fault"  # fault drills: "scale:<k>" or "nan" corrupts this node's updates on purpose

# Input and output names of the head-step graph (`edgekd.deploy.head_step` exports it,
# `edgekd.deploy.runtimes` runs it on devices without torch).
HEAD_STEP_INPUTS: tuple[str, ...] = (
    "features",
    "labels",
    "teacher_logits",
    "weight",
    "bias",
    "class_weights",
    "temperature",
    "alpha",
    "lr",
)
HEAD_STEP_OUTPUTS: tuple[str, ...] = ("new_weight", "new_bias", "loss")
