"""Files and storage: atomic local writes, checksums, remote storage by URI, publishing outputs."""
