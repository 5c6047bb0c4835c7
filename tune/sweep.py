"""`python tune/sweep.py ...` is `ddetr tune ...`: a Ray Tune sweep of ddetr trainings (see ddetr/sweep/driver.py).

python tune/sweep.py --preset tiny --data data/synth --space tune/spaces/tiny.yaml --samples 8
"""

import sys

from ddetr.sweep.driver import main

if __name__ == "__main__":
    sys.exit(main())
