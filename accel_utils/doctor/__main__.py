"""``python -m accel_utils.doctor``: see :mod:`accel_utils.doctor`."""

import sys

from accel_utils.doctor import main

sys.exit(main())
