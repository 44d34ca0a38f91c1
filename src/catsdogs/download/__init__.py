"""Stage 0, ``catsdogs download``: fetch, verify and safely unpack the Cats and Dogs archive."""
