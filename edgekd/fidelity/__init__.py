"""How faithfully a student copies its teacher: numpy scores (`edgekd.fidelity.scores`,
torch-free) and the torch-only probes (`edgekd.fidelity.attacks`)."""
