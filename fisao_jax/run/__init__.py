"""The run frame every method uses (FiSAO, CSR, ViGoR): `methods -> run -> lower layers`.

  setup.py    task data, policy and verifier on the mesh, compiled rollouts (built once per run)
  frame.py    start (validate, workdir, calibration, evaluation before) and finish (evaluation
              after, summary.json, plots) of a run
  log.py      console and log file, metrics.jsonl + TensorBoard, the non-finite guard
  batches.py  host-side prompt batches and padding for the offline methods
  offline.py  passes over a fixed dataset (CSR's pairs, ViGoR's SFT targets)
"""
