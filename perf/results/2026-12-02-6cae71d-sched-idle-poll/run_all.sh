#!/bin/sh
# The runs whose output is in this folder, in the order they ran (binaries of 27110fd).
cd "$(dirname "$0")"
OFF="busy_poll_sched_idle = false"
TUNING="$OFF" ECHO_CPU=0 LOAD_CPUS=0,1 ./placement.py 22000 6 > pinned-echo0-otherpoll.txt 2>&1
TUNING="$OFF" ECHO_CPU=1 LOAD_CPUS=0,1 ./placement.py 22100 6 > pinned-echo1-otherpoll.txt 2>&1
TUNING="$OFF" ./placement.py 22200 6 > unpinned-otherpoll.txt 2>&1
./placement.py 22300 6 > unpinned-sched-idle.txt 2>&1
TUNING="$OFF" CHRT_IDLE=1 ./placement.py 22400 6 > unpinned-chrt-idle-always.txt 2>&1
TUNING="$OFF" HOG=0 ./placement.py 22500 4 > hog-cpu0-otherpoll.txt 2>&1
HOG=0 ./placement.py 22600 4 > hog-cpu0-sched-idle.txt 2>&1
TUNING="$OFF" HOG=0,1 ./placement.py 22700 4 > hog-both-otherpoll.txt 2>&1
HOG=0,1 ./placement.py 22800 4 > hog-both-sched-idle.txt 2>&1
