#define _GNU_SOURCE
#include <stdio.h>
#include <stdint.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <string.h>
struct sched_attr { uint32_t size, sched_policy; uint64_t sched_flags; int32_t sched_nice; uint32_t sched_priority; uint64_t sched_runtime, sched_deadline, sched_period; uint32_t util_min, util_max; };
int main(){ for (int pol=5; pol>=0; pol-=5) { struct sched_attr a; memset(&a,0,sizeof a); a.size=48; a.sched_policy=pol; a.sched_runtime=100000000ULL;
 int r=syscall(SYS_sched_setattr,0,&a,0); struct sched_attr b; memset(&b,0,sizeof b); int r2=syscall(SYS_sched_getattr,0,&b,sizeof b,0);
 printf("policy %d set=%d get=%d pol=%u runtime=%llu\n", pol, r, r2, b.sched_policy, (unsigned long long)b.sched_runtime); } }
