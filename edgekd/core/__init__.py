"""The torch-free core every node imports: config, record keys, the round settings,
class weights, data and data files, metrics, errors. Nothing here imports torch or flwr
beyond numpy (and flwr-datasets' partitioners in `edgekd.core.data`)."""
