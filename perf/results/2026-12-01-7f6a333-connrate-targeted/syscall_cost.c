#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(){struct timespec a,b;clock_gettime(CLOCK_MONOTONIC,&a);for(int i=0;i<1000000;i++)syscall(SYS_getppid);clock_gettime(CLOCK_MONOTONIC,&b);printf("%.0f ns/syscall\n",((b.tv_sec-a.tv_sec)*1e9+(b.tv_nsec-a.tv_nsec))/1e6);}
