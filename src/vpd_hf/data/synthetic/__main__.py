"""`python -m vpd_hf.data.synthetic --output DIR ...`: render the synthetic dataset (see :func:`main`)."""

from .dataset import main

if __name__ == "__main__":
    main()
