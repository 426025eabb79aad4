#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sched.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int c,char**v){int cpu=atoi(v[1]);double secs=atof(v[2]);cpu_set_t s;CPU_ZERO(&s);CPU_SET(cpu,&s);sched_setaffinity(0,sizeof s,&s);
 volatile unsigned long x=0;unsigned long n=0;double t0=now(),end=t0+secs;
 while(1){for(int i=0;i<100000;i++)x+=i;n++;if(now()>end)break;}
 printf("cpu%d %.1f Mloops/s\n",cpu,n*0.1/(now()-t0));return 0;}
