/* The part of libbpf's API that ebpf-otlp uses, for cffi (ABI mode).
 * Declare nothing more than is called: each struct here is checked
 * against the installed libbpf headers by tests/test_binding_layout.py. */
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
typedef int32_t __s32;
typedef int64_t __s64;

struct bpf_object;
struct bpf_program;
struct bpf_map;
struct bpf_link;

enum libbpf_print_level { LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG };
/* va_list travels as a pointer on x86-64 and arm64: it is only forwarded. */
typedef int (*libbpf_print_fn_t)(enum libbpf_print_level level,
				 const char *fmt, void *ap);
libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
__u32 libbpf_major_version(void);
__u32 libbpf_minor_version(void);
const char *libbpf_version_string(void);
int libbpf_num_possible_cpus(void);

struct bpf_object_open_opts {
	size_t sz;
	const char *object_name;
	bool relaxed_maps;
	const char *pin_root_path;
	__u32 _unused_attach_prog_fd;
	const char *kconfig;
	const char *btf_custom_path;
	char *kernel_log_buf;
	size_t kernel_log_size;
	__u32 kernel_log_level;
};

struct bpf_object *bpf_object__open_file(const char *path,
					 const struct bpf_object_open_opts *opts);
struct bpf_object *bpf_object__open_mem(const void *obj_buf, size_t obj_buf_sz,
					const struct bpf_object_open_opts *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
const char *bpf_object__name(const struct bpf_object *obj);
struct bpf_program *bpf_object__next_program(const struct bpf_object *obj,
					     struct bpf_program *prog);
struct bpf_map *bpf_object__next_map(const struct bpf_object *obj,
				     const struct bpf_map *map);

const char *bpf_program__name(const struct bpf_program *prog);
const char *bpf_program__section_name(const struct bpf_program *prog);
bool bpf_program__autoload(const struct bpf_program *prog);
int bpf_program__set_autoload(struct bpf_program *prog, bool autoload);
int bpf_program__fd(const struct bpf_program *prog);
int bpf_program__type(const struct bpf_program *prog);

struct bpf_uprobe_opts {
	size_t sz;
	size_t ref_ctr_offset;
	__u64 bpf_cookie;
	bool retprobe;
	const char *func_name;
};

struct bpf_link *bpf_program__attach(const struct bpf_program *prog);
struct bpf_link *bpf_program__attach_tracepoint(const struct bpf_program *prog,
						const char *tp_category,
						const char *tp_name);
struct bpf_link *bpf_program__attach_raw_tracepoint(const struct bpf_program *prog,
						    const char *tp_name);
struct bpf_link *bpf_program__attach_uprobe_opts(const struct bpf_program *prog,
						 int pid, const char *binary_path,
						 size_t func_offset,
						 const struct bpf_uprobe_opts *opts);
struct bpf_link *bpf_program__attach_xdp(const struct bpf_program *prog, int ifindex);
struct bpf_link *bpf_program__attach_cgroup(const struct bpf_program *prog, int cgroup_fd);
int bpf_link__destroy(struct bpf_link *link);
int bpf_link__fd(const struct bpf_link *link);

const char *bpf_map__name(const struct bpf_map *map);
int bpf_map__fd(const struct bpf_map *map);
int bpf_map__type(const struct bpf_map *map);
__u32 bpf_map__key_size(const struct bpf_map *map);
__u32 bpf_map__value_size(const struct bpf_map *map);
__u32 bpf_map__max_entries(const struct bpf_map *map);
int bpf_map__set_max_entries(struct bpf_map *map, __u32 max_entries);
void *bpf_map__initial_value(struct bpf_map *map, size_t *psize);

int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_update_elem(int fd, const void *key, const void *value, __u64 flags);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);

struct bpf_map_batch_opts {
	size_t sz;
	__u64 elem_flags;
	__u64 flags;
};
int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys,
			 void *values, __u32 *count,
			 const struct bpf_map_batch_opts *opts);
int bpf_map_lookup_and_delete_batch(int fd, void *in_batch, void *out_batch,
				    void *keys, void *values, __u32 *count,
				    const struct bpf_map_batch_opts *opts);

struct bpf_test_run_opts {
	size_t sz;
	const void *data_in;
	void *data_out;
	__u32 data_size_in;
	__u32 data_size_out;
	const void *ctx_in;
	void *ctx_out;
	__u32 ctx_size_in;
	__u32 ctx_size_out;
	__u32 retval;
	int repeat;
	__u32 duration;
	__u32 flags;
	__u32 cpu;
	__u32 batch_size;
};
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);

enum bpf_tc_attach_point {
	BPF_TC_INGRESS = 1,
	BPF_TC_EGRESS = 2,
	BPF_TC_CUSTOM = 4,
};
struct bpf_tc_hook {
	size_t sz;
	int ifindex;
	enum bpf_tc_attach_point attach_point;
	__u32 parent;
};
struct bpf_tc_opts {
	size_t sz;
	int prog_fd;
	__u32 flags;
	__u32 prog_id;
	__u32 handle;
	__u32 priority;
};
int bpf_tc_hook_create(struct bpf_tc_hook *hook);
int bpf_tc_hook_destroy(struct bpf_tc_hook *hook);
int bpf_tc_attach(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);
int bpf_tc_detach(const struct bpf_tc_hook *hook, const struct bpf_tc_opts *opts);
int bpf_tc_query(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);

int bpf_enable_stats(int type);

/* bpf_link_create() as libbpf 1.1 has it. TCX (Linux 6.6) attach types are
 * not in its headers: enum bpf_attach_type holds only what we pass, with
 * the kernel's values (tests/test_binding_layout.py checks them against the
 * running kernel's BTF). The TCX-specific options (relative_fd,
 * expected_revision) are not in 1.1's opts either: we pass no opts, which
 * appends our program after those already on the hook. */
enum bpf_attach_type {
	BPF_TCX_INGRESS = 46,
	BPF_TCX_EGRESS = 47,
};
struct bpf_link_create_opts {
	size_t sz;
	__u32 flags;
	void *iter_info;
	__u32 iter_info_len;
	__u32 target_btf_id;
	__u64 _unused_union[4];	/* perf_event, kprobe_multi, tracing */
};
int bpf_link_create(int prog_fd, int target_fd, enum bpf_attach_type attach_type,
		    const struct bpf_link_create_opts *opts);
/* For TCX, target_fd is the ifindex: the programs on that hook, in run order. */
int bpf_prog_query(int target_fd, enum bpf_attach_type type, __u32 query_flags,
		   __u32 *attach_flags, __u32 *prog_ids, __u32 *prog_cnt);

/* BTF: global variables' offsets in .rodata/.bss, enums of the running kernel. */
struct btf;
struct btf_type {
	__u32 name_off;
	__u32 info;
	__u32 size; /* a union of size and type in btf.h */
};
struct btf_var_secinfo {
	__u32 type;
	__u32 offset;
	__u32 size;
};
struct btf_enum {
	__u32 name_off;
	__s32 val;
};
struct btf *bpf_object__btf(const struct bpf_object *obj);
struct btf *btf__load_vmlinux_btf(void);
void btf__free(struct btf *btf);
__u32 btf__type_cnt(const struct btf *btf);
__s32 btf__find_by_name_kind(const struct btf *btf, const char *type_name, __u32 kind);
const struct btf_type *btf__type_by_id(const struct btf *btf, __u32 id);
const char *btf__name_by_offset(const struct btf *btf, __u32 offset);
