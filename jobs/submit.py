"""`python jobs/submit.py ...` is `ddetr submit ...`: submit, follow, list and stop Ray Jobs (see ddetr/jobs.py).

python jobs/submit.py train --preset tiny --data s3://bucket/coco-shards train.name=tiny-a --follow
python jobs/submit.py --list
"""

import sys

from ddetr.jobs import main

if __name__ == "__main__":
    sys.exit(main())
