"""The sample contract every stage agrees on: records (records.py), their images (images.py,
media.py) and their token ids and labels under a chat template (prompt.py)."""
