"""Source files copied into a `vlm-export hf` custom-code export (see vlm_dist.inference.export_remote).

They import only torch and transformers, and each other by relative import, because transformers
copies them into its modules cache and imports them from there (`trust_remote_code=True`).
"""
