for i in $(seq 1 60); do
  for t in /proc/[0-9]*/task/[0-9]*; do
    c=$(cat $t/comm 2>/dev/null) || continue
    case "$c" in *awake*|*uring*) s=$(cut -d' ' -f14,15 $t/stat 2>/dev/null); echo "$i ${t##*/} $c $s";; esac
  done
  sleep 0.5
done
