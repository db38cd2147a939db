"""Fixed case counts and Hypothesis settings of the fuzz tests (about 60 s on 2 cores).

No example database: CI must not depend on what an earlier local run found. No
deadline: a case's time is the daemon's and the machine's, bounded by the client's
own 5 s timeout instead.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

PARSER_ANY_TEXT = 1600
PARSER_ROUND_TRIP = 1300
PARSER_MUTATIONS = 900
PARSER_NOT_STR = 200
HTTP_STRUCTURED = 4000
RAW_ARBITRARY = 800
RAW_MUTATIONS = 1200

FUZZ = settings(
    database=None,
    deadline=None,
    derandomize=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
