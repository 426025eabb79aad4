#define _GNU_SOURCE
#include <stdio.h>
#include <stdint.h>
#include <sched.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <string.h>
struct sched_attr { uint32_t size, sched_policy; uint64_t sched_flags; int32_t sched_nice; uint32_t sched_priority; uint64_t sched_runtime, sched_deadline, sched_period; uint32_t util_min, util_max; };
static void show(const char*s){ struct sched_attr b; memset(&b,0,sizeof b); syscall(SYS_sched_getattr,0,&b,sizeof b,0); printf("%s: pol=%u slice=%llu\n", s, b.sched_policy, (unsigned long long)b.sched_runtime);}
int main(){ struct sched_attr a; memset(&a,0,sizeof a); a.size=48; a.sched_policy=0; a.sched_runtime=100000000ULL;
 show("start"); syscall(SYS_sched_setattr,0,&a,0); show("setattr other 100ms");
 struct sched_param p={0}; sched_setscheduler(0,SCHED_IDLE,&p); show("setscheduler idle");
 sched_setscheduler(0,SCHED_OTHER,&p); show("setscheduler other"); }
