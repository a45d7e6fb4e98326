"""GPU correctness checks: our engine and model core against transformers and PEFT on a real device
(CPU smoke runs with ``--device cpu``)."""
