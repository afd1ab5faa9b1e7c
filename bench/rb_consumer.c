// SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause
/*
 * Reference ring buffer consumer for the drain benchmark: plain libbpf, no
 * Python. Loads the self-test object, drives its `rb_produce` XDP program
 * with BPF_PROG_TEST_RUN from a producer thread (flat out, or paced to a
 * rate) and drains the ring on the main thread with either
 *   --mode consume: ring_buffer__consume() in a loop, sleeping --timer-us
 *                   when the ring is empty (meant for a no-wakeup producer);
 *   --mode poll:    ring_buffer__poll() (epoll, woken by the producer).
 * Prints one JSON object: records received, lost (ring full, from the
 * object's own counter), sequence gaps, elapsed time and rate.
 *
 * Build: gcc -O2 -o rb_consumer rb_consumer.c -lbpf -lpthread
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>

/* Must match struct selftest_event in bpf/selftest.h (48 bytes). */
struct event {
	uint64_t seq;
	uint64_t ts_ns;
	uint32_t cpu;
	uint32_t pkt_len;
	uint8_t pad[24];
};

struct opts {
	const char *obj_path;
	const char *mode;
	uint32_t wakeup_bytes;
	uint32_t per_run;
	uint64_t records;
	uint32_t ring_bytes;
	double rate;		/* records/s; 0 = flat out */
	int prog_fd;		/* producer only, on an inherited program fd */
	unsigned timer_us;
};

static struct {
	uint64_t received;
	uint64_t gaps;
	uint64_t bad_size;
	uint64_t next_seq;
	int started;
} st;

static atomic_int producer_done;
static atomic_uint_fast64_t produced;
static int prog_fd;
static struct opts o = {
	.mode = "consume", .wakeup_bytes = 0xffffffffu, .per_run = 64,
	.records = 5000000, .ring_bytes = 16u << 20, .rate = 0, .timer_us = 1000,
	.prog_fd = -1,
};

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double thread_cpu_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Count and check every record: the work any real consumer does at least. */
static int on_event(void *ctx, void *data, size_t size)
{
	const struct event *e = data;

	if (size != sizeof(*e)) {
		st.bad_size++;
		return 0;
	}
	if (st.started && e->seq != st.next_seq)
		st.gaps += e->seq > st.next_seq ? e->seq - st.next_seq : 1;
	st.started = 1;
	st.next_seq = e->seq + 1;
	st.received++;
	return 0;
}

static int run_prog(uint32_t repeat)
{
	char pkt[64] = { 0 };
	LIBBPF_OPTS(bpf_test_run_opts, t, .data_in = pkt, .data_size_in = sizeof(pkt),
		    .repeat = repeat);

	return bpf_prog_test_run_opts(prog_fd, &t);
}

/*
 * Producer: flat out in one BPF_PROG_TEST_RUN call, or paced to --rate with
 * one run (64 records) per call. An XDP test run with repeat > 1 costs a
 * fixed ~20 ms here, sometimes far more under load (the kernel swaps the XDP
 * dispatcher in and out), which would turn pacing into bursts bigger than
 * the ring; repeat == 1 skips the swap.
 */
static void *producer(void *arg)
{
	const uint64_t runs_total = (o.records + o.per_run - 1) / o.per_run;
	uint64_t runs = 0;
	double t0 = now_s();

	while (runs < runs_total) {
		if (o.rate > 0) {
			double allowed = (now_s() - t0) * o.rate / o.per_run;

			if (allowed < runs + 1) {
				usleep(100);
				continue;
			}
			if (run_prog(1))
				break;
			runs++;
		} else {
			if (run_prog(runs_total - runs))
				break;
			runs = runs_total;
		}
		atomic_store(&produced, runs * o.per_run);
	}
	if (runs < runs_total)
		fprintf(stderr, "test_run: %s\n", strerror(errno));
	atomic_store(&producer_done, 1);
	return NULL;
}

static int set_rodata(struct bpf_object *obj, const char *name, uint32_t value)
{
	struct btf *btf = bpf_object__btf(obj);
	struct bpf_map *map, *ro = NULL;
	const struct btf_type *sec;
	const struct btf_var_secinfo *v;
	size_t size;
	char *data;

	int id;

	bpf_object__for_each_map(map, obj)
		if (strstr(bpf_map__name(map), ".rodata"))
			ro = map;
	id = btf__find_by_name_kind(btf, ".rodata", BTF_KIND_DATASEC);
	if (!ro || id < 0)
		return -ENOENT;
	data = (char *)bpf_map__initial_value(ro, &size);
	sec = btf__type_by_id(btf, id);
	v = btf_var_secinfos(sec);
	for (int i = 0; i < btf_vlen(sec); i++, v++) {
		const struct btf_type *var = btf__type_by_id(btf, v->type);

		if (strcmp(btf__name_by_offset(btf, var->name_off), name))
			continue;
		if (v->size != sizeof(value) || v->offset + v->size > size)
			return -EINVAL;
		memcpy(data + v->offset, &value, sizeof(value));
		return 0;
	}
	return -ENOENT;
}

static uint64_t lost_total(int fd)
{
	int ncpu = libbpf_num_possible_cpus();
	uint64_t vals[ncpu], sum = 0;
	uint32_t zero = 0;

	if (bpf_map_lookup_elem(fd, &zero, vals))
		return 0;
	for (int i = 0; i < ncpu; i++)
		sum += vals[i];
	return sum;
}

static void usage(const char *argv0)
{
	fprintf(stderr,
		"usage: %s OBJ [--mode consume|poll] [--wakeup-bytes N] [--records N]\n"
		"          [--per-run N] [--ring-bytes N] [--rate RECORDS_PER_S] [--timer-us N]\n"
		"       %s - --prog-fd FD [--records N] [--per-run N] [--rate R]  (producer only)\n",
		argv0, argv0);
	exit(2);
}

static void parse(int argc, char **argv)
{
	if (argc < 2)
		usage(argv[0]);
	o.obj_path = argv[1];
	for (int i = 2; i < argc; i++) {
		const char *k = argv[i];
		const char *v = i + 1 < argc ? argv[++i] : NULL;

		if (!v)
			usage(argv[0]);
		if (!strcmp(k, "--mode"))
			o.mode = v;
		else if (!strcmp(k, "--wakeup-bytes"))
			o.wakeup_bytes = strtoul(v, NULL, 0);
		else if (!strcmp(k, "--records"))
			o.records = strtoull(v, NULL, 0);
		else if (!strcmp(k, "--per-run"))
			o.per_run = strtoul(v, NULL, 0);
		else if (!strcmp(k, "--ring-bytes"))
			o.ring_bytes = strtoul(v, NULL, 0);
		else if (!strcmp(k, "--rate"))
			o.rate = strtod(v, NULL);
		else if (!strcmp(k, "--prog-fd"))
			o.prog_fd = strtol(v, NULL, 0);
		else if (!strcmp(k, "--timer-us"))
			o.timer_us = strtoul(v, NULL, 0);
		else
			usage(argv[0]);
	}
	if (strcmp(o.mode, "consume") && strcmp(o.mode, "poll"))
		usage(argv[0]);
	if (o.per_run < 1 || o.per_run > 64)
		usage(argv[0]);
}

int main(int argc, char **argv)
{
	struct bpf_object *obj;
	struct bpf_program *prog, *p;
	struct ring_buffer *rb;
	pthread_t thr;
	double t0, t_last, cpu0, deadline = 0;
	uint64_t lost;
	int err, lost_fd, poll_mode;

	parse(argc, argv);
	if (o.prog_fd >= 0) {
		/* Producer for another consumer (the Python one): same pacing. */
		double t = now_s();

		prog_fd = o.prog_fd;
		producer(NULL);
		printf("{\"produced\": %llu, \"seconds\": %.6f}\n",
		       (unsigned long long)atomic_load(&produced), now_s() - t);
		return 0;
	}
	poll_mode = !strcmp(o.mode, "poll");
	libbpf_set_strict_mode(LIBBPF_STRICT_ALL);
	obj = bpf_object__open_file(o.obj_path, NULL);
	if (!obj) {
		fprintf(stderr, "open %s: %s\n", o.obj_path, strerror(errno));
		return 1;
	}
	prog = bpf_object__find_program_by_name(obj, "rb_produce");
	if (!prog) {
		fprintf(stderr, "no program rb_produce in %s\n", o.obj_path);
		return 1;
	}
	bpf_object__for_each_program(p, obj)
		bpf_program__set_autoload(p, p == prog);
	if (set_rodata(obj, "records_per_run", o.per_run) ||
	    set_rodata(obj, "ringbuf_wakeup_bytes", o.wakeup_bytes)) {
		fprintf(stderr, "cannot set rodata of %s\n", o.obj_path);
		return 1;
	}
	bpf_map__set_max_entries(bpf_object__find_map_by_name(obj, "test_events"), o.ring_bytes);
	err = bpf_object__load(obj);
	if (err) {
		fprintf(stderr, "load: %s\n", strerror(-err));
		return 1;
	}
	prog_fd = bpf_program__fd(prog);
	lost_fd = bpf_map__fd(bpf_object__find_map_by_name(obj, "test_events_lost"));
	rb = ring_buffer__new(bpf_map__fd(bpf_object__find_map_by_name(obj, "test_events")),
			      on_event, NULL, NULL);
	if (!rb) {
		fprintf(stderr, "ring_buffer__new: %s\n", strerror(errno));
		return 1;
	}

	cpu0 = thread_cpu_s();
	t0 = t_last = now_s();
	pthread_create(&thr, NULL, producer, NULL);
	for (;;) {
		uint64_t before = st.received;

		if (poll_mode) {
			err = ring_buffer__poll(rb, 10);
		} else {
			err = ring_buffer__consume(rb);
			if (err == 0)
				usleep(o.timer_us);
		}
		if (err < 0 && err != -EINTR) {
			fprintf(stderr, "ring buffer: %s\n", strerror(-err));
			break;
		}
		if (st.received != before)
			t_last = now_s();
		if (atomic_load(&producer_done)) {
			/* Everything submitted is either received or counted as lost;
			 * give a straggler at most 2 s after the producer stopped. */
			if (!deadline)
				deadline = now_s() + 2;
			if (st.received + lost_total(lost_fd) >= atomic_load(&produced) ||
			    now_s() > deadline)
				break;
		}
	}
	pthread_join(thr, NULL);
	ring_buffer__consume(rb);
	lost = lost_total(lost_fd);
	printf("{\"mode\": \"%s\", \"wakeup_bytes\": %u, \"records_per_run\": %u, "
	       "\"ring_bytes\": %u, \"offered_rate\": %.0f, \"produced\": %llu, "
	       "\"received\": %llu, \"lost\": %llu, \"gaps\": %llu, \"bad_size\": %llu, "
	       "\"seconds\": %.6f, \"records_per_s\": %.0f, \"consumer_cpu_s\": %.6f}\n",
	       o.mode, o.wakeup_bytes, o.per_run, o.ring_bytes, o.rate,
	       (unsigned long long)atomic_load(&produced), (unsigned long long)st.received,
	       (unsigned long long)lost, (unsigned long long)st.gaps,
	       (unsigned long long)st.bad_size, t_last - t0,
	       st.received / (t_last - t0), thread_cpu_s() - cpu0);
	ring_buffer__free(rb);
	bpf_object__close(obj);
	return 0;
}
