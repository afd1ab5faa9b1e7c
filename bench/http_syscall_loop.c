// A process that makes syscalls and no HTTP: write and read 16 bytes over a
// UNIX socket pair, then getppid(). Prints CPU ns per iteration (3 syscalls).
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 300000;
	char b[16] = {0};
	int sv[2];
	struct rusage r;

	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
		return 1;
	for (long i = 0; i < n; i++) {
		if (write(sv[0], b, sizeof(b)) != sizeof(b) || read(sv[1], b, sizeof(b)) != sizeof(b))
			return 1;
		getppid();
	}
	getrusage(RUSAGE_SELF, &r);
	printf("%.1f\n", ((r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1e9 +
			  (r.ru_utime.tv_usec + r.ru_stime.tv_usec) * 1e3) / n);
	return 0;
}
