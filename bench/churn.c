// SPDX-License-Identifier: Apache-2.0
/*
 * TCP connection churn generator for bench/tcp_churn.py: the Python client
 * tops out near 4,500 connections/s here, below the rates the agent has to
 * be measured at. Single-threaded, epoll, non-blocking.
 *
 *   churn server PORT
 *       accept; read a request; answer 100 bytes; close (the server closes
 *       first, so TIME_WAIT stays on its side and client ports recycle).
 *   churn client HOST PORT SECONDS CONCURRENCY RATE
 *       keep up to CONCURRENCY connections in flight (connect, send 100
 *       bytes, read to EOF, close), opening at most RATE per second (0: as
 *       fast as possible); prints {"n": done, "secs": ..., "errors": ...}.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static char buf[4096];
static char msg[100];

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int server(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	struct epoll_event ev, evs[256];
	int one = 1, s, ep;

	s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(s, (struct sockaddr *)&a, sizeof(a)) || listen(s, 4096)) {
		perror("bind/listen");
		return 1;
	}
	ep = epoll_create1(0);
	ev.events = EPOLLIN;
	ev.data.fd = s;
	epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		int n = epoll_wait(ep, evs, 256, -1);

		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;

			if (fd == s) {
				int c;

				while ((c = accept4(s, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
					ev.events = EPOLLIN;
					ev.data.fd = c;
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
				}
				continue;
			}
			if (read(fd, buf, sizeof(buf)) < 0 && errno == EAGAIN)
				continue;
			if (write(fd, msg, sizeof(msg)) < 0) {
				/* the peer went away: just close */
			}
			close(fd);	/* also leaves the epoll set */
		}
	}
}

static int open_one(int ep, const struct sockaddr_in *a)
{
	struct epoll_event ev;
	int c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);

	if (c < 0)
		return -1;
	if (connect(c, (const struct sockaddr *)a, sizeof(*a)) && errno != EINPROGRESS) {
		close(c);
		return -1;
	}
	ev.events = EPOLLOUT;
	ev.data.u64 = (unsigned long long)c;	/* bit 32 set once the request is sent */
	epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
	return 0;
}

static int client(const char *host, int port, double secs, int conc, double rate)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	struct epoll_event ev, evs[256];
	long done = 0, opened = 0, errors = 0;
	int inflight = 0, ep = epoll_create1(0);
	double t0 = now(), end = t0 + secs, t;

	inet_pton(AF_INET, host, &a.sin_addr);
	while ((t = now()) < end || inflight) {
		long allowed = rate > 0 ? (long)((t - t0) * rate) : opened + conc;

		while (t < end && inflight < conc && opened < allowed) {
			if (open_one(ep, &a))
				errors++;
			else
				inflight++;
			opened++;
		}
		int n = epoll_wait(ep, evs, 256, 1);

		for (int i = 0; i < n; i++) {
			int fd = (int)(evs[i].data.u64 & 0xffffffff);
			int err = 0;
			socklen_t el = sizeof(err);

			if (!(evs[i].data.u64 >> 32)) {	/* connected (or failed) */
				getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
				if (err || write(fd, msg, sizeof(msg)) != sizeof(msg)) {
					errors++;
					close(fd);
					inflight--;
					continue;
				}
				ev.events = EPOLLIN;
				ev.data.u64 = (unsigned long long)fd | (1ULL << 32);
				epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
				continue;
			}
			ssize_t r = read(fd, buf, sizeof(buf));

			if (r > 0 || (r < 0 && errno == EAGAIN))
				continue;
			if (r < 0)
				errors++;
			else
				done++;
			close(fd);
			inflight--;
		}
	}
	printf("{\"n\": %ld, \"secs\": %.3f, \"errors\": %ld}\n", done, now() - t0, errors);
	return 0;
}

int main(int argc, char **argv)
{
	memset(msg, 'q', sizeof(msg));
	if (argc == 3 && !strcmp(argv[1], "server"))
		return server(atoi(argv[2]));
	if (argc == 7 && !strcmp(argv[1], "client"))
		return client(argv[2], atoi(argv[3]), atof(argv[4]), atoi(argv[5]), atof(argv[6]));
	fprintf(stderr, "usage: churn server PORT | churn client HOST PORT SECS CONC RATE\n");
	return 2;
}
