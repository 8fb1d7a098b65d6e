"""The helper's foreign declarations, for cffi's out-of-line ABI mode.

Run `python helper/ffi_build.py` after changing them: it writes
helper/_ffi.py, a generated pure-Python module that is committed
(tests/test_helper_small.py regenerates it and fails on any drift).  At run
time that module needs only cffi's `_cffi_backend` extension: the C
declarations below were parsed here, at build time, never as root.  No
callbacks (their trampolines would need W+X memory, which seccomp forbids).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cffi import FFI

OUT = Path(__file__).resolve().parent / "_ffi.py"

DECLARATIONS = """
long syscall(long number, ...);                       /* libc */

struct cap_header { uint32_t version; int pid; };     /* capget/capset, v3 */
struct cap_data { uint32_t effective, permitted, inheritable; };

struct landlock_ruleset_attr { uint64_t handled_access_fs, handled_access_net, scoped; };

struct sock_fprog { unsigned short len; void *filter; };   /* PR_SET_SECCOMP */

/* libseccomp (enums as int: the ABI's width) */
struct scmp_arg_cmp { unsigned int arg; int op; uint64_t datum_a; uint64_t datum_b; };
void *seccomp_init(uint32_t def_action);
void seccomp_release(void *ctx);
int seccomp_syscall_resolve_name(const char *name);
int seccomp_rule_add_array(void *ctx, uint32_t action, int syscall, unsigned int arg_cnt,
                           const struct scmp_arg_cmp *arg_array);
int seccomp_export_bpf(void *ctx, int fd);
"""

# The kernel's is packed: 12 bytes, not 16.
PACKED = "struct landlock_path_beneath_attr { uint64_t allowed_access; int32_t parent_fd; };"


def build() -> FFI:
    ffi = FFI()
    ffi.cdef(DECLARATIONS)
    ffi.cdef(PACKED, packed=True)
    ffi.set_source("gcroots.helper._ffi", None)
    return ffi


if __name__ == "__main__":
    build().emit_python_code(str(sys.argv[1] if len(sys.argv) > 1 else OUT))
