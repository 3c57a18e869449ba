"""Data: the FETAL_PLANES_DB reader, image preprocessing, decoded splits and phantom data."""
