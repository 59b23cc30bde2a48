// Two processes pinned to the same CPU pass one byte back and forth through two pipes: every hand-over is a
// wakeup and a context switch, where the sched probe (sched_wakeup, sched_switch) runs. Prints nanoseconds per
// context switch, counted by the kernel (voluntary switches of both processes), not assumed.
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long voluntary_switches(void) {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return usage.ru_nvcsw;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000;
    int cpu = argc > 2 ? atoi(argv[2]) : 1;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0)
        perror("sched_setaffinity");
    int ping[2], pong[2], report[2];
    if (pipe(ping) || pipe(pong) || pipe(report)) {
        perror("pipe");
        return 1;
    }
    char byte = 0;
    pid_t child = fork();  // inherits the affinity: both on `cpu`
    if (child == 0) {
        long before = voluntary_switches();
        for (long i = 0; i < n; i++)
            if (read(ping[0], &byte, 1) != 1 || write(pong[1], &byte, 1) != 1)
                _exit(1);
        long switches = voluntary_switches() - before;
        _exit(write(report[1], &switches, sizeof(switches)) == sizeof(switches) ? 0 : 1);
    }
    long before = voluntary_switches();
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        if (write(ping[1], &byte, 1) != 1 || read(pong[0], &byte, 1) != 1) {
            perror("ping-pong");
            return 1;
        }
    clock_gettime(CLOCK_MONOTONIC, &b);
    long switches = voluntary_switches() - before, child_switches = 0;
    int status;
    if (read(report[0], &child_switches, sizeof(child_switches)) != sizeof(child_switches) ||
        waitpid(child, &status, 0) != child || status != 0) {
        fprintf(stderr, "ping-pong: the child failed\n");
        return 1;
    }
    switches += child_switches;
    if (switches < n) {  // not switching on every hand-over: the processes are not sharing one CPU
        fprintf(stderr, "ping-pong: only %ld context switches for %ld round trips\n", switches, n);
        return 1;
    }
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%.2f\n", ns / switches);
    return 0;
}
