"""``python -m dinomix_cache`` = the ``dinomix-cache`` console script (for machines without it)."""

from dinomix_cache.cli import main

if __name__ == "__main__":
    main()
