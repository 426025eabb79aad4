#define _GNU_SOURCE
#include <sched.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>
// spinner CPU POLICY(other|idle) NICE YIELD(0|1)
int main(int c, char **v) {
  cpu_set_t s; CPU_ZERO(&s); CPU_SET(atoi(v[1]), &s); sched_setaffinity(0, sizeof s, &s);
  struct sched_param p = {0};
  if (v[2][0] == 'i') sched_setscheduler(0, SCHED_IDLE, &p);
  setpriority(PRIO_PROCESS, 0, atoi(v[3]));
  int y = atoi(v[4]);
  for (;;) { if (y) sched_yield(); }
}
