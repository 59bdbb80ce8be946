"""Files that ship with the package: TAESD weights (taesd/, MIT, see taesd/LICENSE)."""
