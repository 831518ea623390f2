#!/bin/bash
# One srun task per node runs this: the launcher command given as arguments (torchrun), made safe for
# Slurm's USR1.
#
# Why: SIGUSR1 kills a process that does not handle it, and torchrun does not handle it. If torchrun
# died, srun would see the task end and stop the step while the training processes write their
# checkpoint. So torchrun starts with USR1 ignored (an ignored signal stays ignored across exec; the
# trainer installs its own handler), and this script passes USR1/TERM on to torchrun's children:
# the training processes, which save and exit 0, after which torchrun exits 0 too.
set -uo pipefail

trap '' USR1
"$@" &
launcher=$!

trap 'pkill -USR1 -P "$launcher" || true' USR1
trap 'pkill -TERM -P "$launcher" || true' TERM

while true; do
    wait "$launcher" && status=0 || status=$?
    kill -0 "$launcher" 2>/dev/null || break
done
exit "$status"
