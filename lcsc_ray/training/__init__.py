"""Training runs that save checkpoint trajectories: consistency training (ct.py), EDM diffusion training
(dm.py), the shared loop (loop.py), checkpoint save/resume (checkpointing.py) and the embedded demo (demo.py)."""
