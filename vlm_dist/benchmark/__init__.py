"""vlm-benchmark: training throughput and MFU on the real architecture with synthetic features
(cli.py), its workloads (workload.py) and measurements (measure.py)."""
