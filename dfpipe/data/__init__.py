"""Label CSVs, image decoding, the prepared image cache and Datasets."""
