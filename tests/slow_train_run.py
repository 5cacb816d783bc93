"""`python -m tests.slow_train_run ARGS`: train.run's CLI that pauses after each train step,
so a test has room to interrupt a run mid-way (SIGTERM, SIGKILL); the numerics are unchanged."""

import sys
import time

from train import run
from train import step as step_lib

STEP_DELAY_S = 0.3


def with_step_delay(jit_train_step):
    """jit_train_step whose compiled step sleeps STEP_DELAY_S after each call."""

    def jit_slow_train_step(*args, **kwargs):
        train_step = jit_train_step(*args, **kwargs)

        def slow_train_step(*step_args):
            out = train_step(*step_args)
            time.sleep(STEP_DELAY_S)
            return out

        return slow_train_step

    return jit_slow_train_step


if __name__ == "__main__":
    step_lib.jit_train_step = with_step_delay(step_lib.jit_train_step)
    sys.exit(run.main())
