"""The wire format, torch-free: plain records (`edgekd.wire.payload`) and the INT8,
sparse and delta codec (`edgekd.wire.codec`) that server and nodes share."""
