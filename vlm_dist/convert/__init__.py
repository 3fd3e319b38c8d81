"""vlm-convert: public datasets (formats/) -> contract records (cli.py), stage-1 caption hygiene
(hygiene.py), the supervision check (supervision.py), and the side files each writes (side_files.py)."""
