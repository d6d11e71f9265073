"""``python -m pyro_nf``: the package's main job (see :mod:`pyro_nf.demo`)."""

from pyro_nf.demo import main

if __name__ == "__main__":
    main()
