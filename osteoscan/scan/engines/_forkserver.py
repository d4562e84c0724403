"""Imported only by the reader forkserver (as a preload module): it dies with the scan.

Never import this module anywhere else: in the scan's own process it would tie the scan's life to
its parent's (a shell, cron).
"""

import os

from osteoscan.scan.engines.lifeline import SCAN_PID_ENV, die_with_parent

# The scan may have died while this process was starting: compare with the pid it recorded.
die_with_parent(parent=int(os.environ.get(SCAN_PID_ENV) or os.getppid()))
