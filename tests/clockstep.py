"""A wall clock that steps, for the processes of one test: as NTP steps a clock that was
wrong (a dead RTC battery, a VM resumed), while the monotonic clock runs on.

``ClockStep(workdir)`` compiles a small preload library (gcc, as the package build needs)
that adds an offset to ``CLOCK_REALTIME`` and ``CLOCK_REALTIME_COARSE`` (``clock_gettime``,
``gettimeofday``, ``time``) and nothing else; ``env()`` is what a process needs to run
under it, ``step(seconds)`` moves every such process's wall clock at once (read again
within 50 ms).  The kernel's own times (a file's mtime and ctime) are not moved: as after a
real step, files written before it may look as if from the future.  libfaketime is no help
here: with the monotonic clock left alone it breaks Python's ``time.sleep`` (EINVAL).
"""

from __future__ import annotations

import os
import shutil
import subprocess

_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *);
static long offset;
static struct timespec read_at;
static int read_once;

static long current_offset(void) {
    struct timespec now;
    real_clock_gettime(CLOCK_MONOTONIC, &now);
    long since_ms = (now.tv_sec - read_at.tv_sec) * 1000 + (now.tv_nsec - read_at.tv_nsec) / 1000000;
    if (!read_once || since_ms >= 50) {
        read_once = 1;
        read_at = now;
        const char *path = getenv("HAMIRROR_TEST_CLOCK_STEP");
        FILE *f = path ? fopen(path, "re") : NULL;
        if (f) {
            long value;
            if (fscanf(f, "%ld", &value) == 1)
                offset = value;
            fclose(f);
        }
    }
    return offset;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    if (!real_clock_gettime)
        real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real_clock_gettime(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE))
        ts->tv_sec += current_offset();
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (tv) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return 0;
}

time_t time(time_t *t) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (t)
        *t = ts.tv_sec;
    return ts.tv_sec;
}
"""


def clockstep_unavailable() -> str | None:
    return None if shutil.which("gcc") else "needs gcc (build-essential) for the clock-step library"


class ClockStep:
    def __init__(self, workdir: str):
        here = os.path.join(workdir, "clockstep")
        os.makedirs(here, exist_ok=True)
        source = os.path.join(here, "clockstep.c")
        with open(source, "w") as f:
            f.write(_SOURCE)
        self.library = os.path.join(here, "clockstep.so")
        subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", self.library, source, "-ldl"], check=True,
                       capture_output=True)  # fmt: skip
        self.offset_file = os.path.join(here, "offset")
        self.step(0)

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["LD_PRELOAD"] = self.library
        env["HAMIRROR_TEST_CLOCK_STEP"] = self.offset_file
        return env

    def step(self, seconds: int) -> None:
        """Every process under it reads ``seconds`` more (or less) than the true time."""
        temp = self.offset_file + ".new"
        with open(temp, "w") as f:
            f.write(f"{seconds}\n")
        os.replace(temp, self.offset_file)
