"""Datasets: the catalogue, fetching with checksums, decoding, the tensor cache, preprocessing."""
