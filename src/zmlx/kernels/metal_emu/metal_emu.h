// A small C++20 emulation of the Metal Shading Language subset zmlx's kernels use, so that
// each Metal body can be compiled with g++ and run on the CPU against its reference
// (zmlx.kernels.metal_emu). It is meant to be harsher than a GPU, never kinder:
// - each GPU thread is a fiber of one OS thread (deterministic for a seed); threadgroups run
//   in a seeded shuffled order (never the natural one), and the threads of a group in a
//   reshuffled order between every two synchronization points;
// - threadgroup arrays are filled with 0xFF bytes (NaN for floats) at each group's start,
//   and every access is checked: out of bounds, read before any thread of the group wrote
//   it, or a data race (two threads touch one element, one of them writing, with no
//   threadgroup_barrier between them: a shadow word per element holds the barrier epoch and
//   the thread of the last write and reads) stops the run with a message;
// - bfloat16_t and half round after every operation (MLX's bf16.h rules: bf16 op bf16 ->
//   bf16, bf16 op float -> float);
// - simd_* and threadgroup_barrier must be reached by every live thread of the simdgroup /
//   threadgroup at the same call and sync count: divergent calls (a simd_sum in one branch
//   of an if, a lane that has returned) stop the run, as they are undefined on CUDA's
//   full-mask shuffles and reduce only the active lanes on Metal.
// A failed check prints "zmlx-emu: ..." and exits 4.
//
// Supported: bfloat16_t, half, uint/uint2/uint3, the device/constant/thread address-space
// qualifiers, 1-D threadgroup arrays in a kernel body (the Python side rewrites their
// declarations into zmlx_emu::Shared), thread_position_in_grid, thread_position_in_threadgroup,
// threadgroup_position_in_grid, threads_per_threadgroup, thread_index_in_simdgroup,
// simdgroup_index_in_threadgroup, threadgroup_barrier(mem_flags::...), simd_sum / simd_max /
// simd_min / simd_shuffle_xor on float (32-wide), metal:: math (exp, log, sqrt, rsqrt, abs,
// max, min, fma, precise::exp/log/sqrt/rsqrt, isnan, isinf), as_type<T>.
// Anything else fails to compile, which the test reports as outside the subset.
#pragma once
#include <ucontext.h>
#include <sys/mman.h>
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "metal_emu_types.h"

#define device
#define constant
#define thread
#define kernel
// a threadgroup declaration the Python side did not rewrite (a pointer, a 2-D array)
#define threadgroup zmlx_threadgroup_outside_the_emulated_subset

enum class mem_flags { mem_none, mem_device, mem_threadgroup };
inline mem_flags operator|(mem_flags a, mem_flags) { return a; }

namespace zmlx_emu {
[[noreturn]] inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fputs("zmlx-emu: ", stderr);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  va_end(ap);
  std::exit(4);
}

enum State : uint8_t { RUNNABLE, AT_BARRIER, AT_SIMD, DONE };
struct Fiber {
  ucontext_t uc;
  uint3 tpig, tpitg, tgpig, tptg;
  uint lane, simd, id;  // id: linear index in the threadgroup
  State state;
  const char* what;  // the sync call it waits at, and where
  const char* file;
  int line;
  int last_line;  // the last sync it passed (for messages)
  uint64_t syncs;  // sync calls passed: equal on every lane of a convergent path
  float in, out;
  uint mask;
};
inline Fiber* cur;
inline ucontext_t sched;
inline uint64_t epoch = 0, group_epoch = 0;  // barrier epoch now; the current group's first

inline void wait_at(State s, const char* what, const char* file, int line) {
  cur->state = s;
  cur->what = what;
  cur->file = file;
  cur->line = line;
  swapcontext(&cur->uc, &sched);
}
inline void barrier(mem_flags, const char* file, int line) {
  wait_at(AT_BARRIER, "threadgroup_barrier", file, line);
}
inline float simd(const char* what, float v, uint mask, const char* file, int line) {
  cur->in = v;
  cur->mask = mask;
  wait_at(AT_SIMD, what, file, line);
  return cur->out;
}

// ---- threadgroup arrays: poisoned at each group's start, every access checked
struct Shadow {
  uint64_t w_epoch = 0, r_epoch = 0;
  uint writer = 0, reader = 0;
  bool readers = false;  // more than one thread read in r_epoch
};
struct SharedBase;
inline std::vector<SharedBase*> arrays;
// The first read of an element no thread of the group has written: reported at the next
// barrier (or the group's end) unless a write by another thread in the same barrier interval
// shows it to be a race first, so that a missing barrier reads as a race in every order.
struct Unwritten {
  SharedBase* array;
  size_t i;
  uint tid;
  int after_line;
};
inline Unwritten unwritten{};
struct SharedBase {
  const char* name;
  size_t n;
  std::vector<Shadow> shadow;
  SharedBase(const char* nm, size_t count) : name(nm), n(count), shadow(count) { arrays.push_back(this); }
  virtual void poison() = 0;
  [[noreturn]] void race(size_t i, uint other, const char* kind) {
    fail("data race on threadgroup %s[%zu]: thread %u and thread %u of threadgroup (%u,%u,%u) %s it "
         "with no threadgroup_barrier between them (after the sync at line %d, 0: the start)", name, i,
         other, cur->id, cur->tgpig.x, cur->tgpig.y, cur->tgpig.z, kind, cur->last_line);
  }
  void read(size_t i) {
    Shadow& s = shadow[i];
    if (s.w_epoch < group_epoch && !unwritten.array) unwritten = {this, i, cur->id, cur->last_line};
    if (s.w_epoch == epoch && s.writer != cur->id) race(i, s.writer, "write and read");
    if (s.r_epoch != epoch) { s.r_epoch = epoch; s.reader = cur->id; s.readers = false; }
    else if (s.reader != cur->id) s.readers = true;
  }
  void write(size_t i) {
    Shadow& s = shadow[i];
    if (s.w_epoch == epoch && s.writer != cur->id) race(i, s.writer, "both write");
    if (s.r_epoch == epoch && (s.readers || s.reader != cur->id)) race(i, s.reader, "read and write");
    s.w_epoch = epoch;
    s.writer = cur->id;
  }
};
inline void check_unwritten(uint3 group) {
  if (const Unwritten u = unwritten; u.array)
    fail("reads threadgroup %s[%zu] before any thread of threadgroup (%u,%u,%u) wrote it (thread %u, "
         "after the sync at line %d): threadgroup memory starts undefined", u.array->name, u.i, group.x,
         group.y, group.z, u.tid, u.after_line);
}
template <typename T>
struct Ref {
  SharedBase* a;
  size_t i;
  T* p;
  operator T() const { a->read(i); return *p; }
  Ref& operator=(const T& v) { a->write(i); *p = v; return *this; }
  Ref& operator=(const Ref& o) { return *this = T(o); }
  template <class U> Ref& operator+=(const U& v) { return *this = T(T(*this) + v); }
  template <class U> Ref& operator-=(const U& v) { return *this = T(T(*this) - v); }
  template <class U> Ref& operator*=(const U& v) { return *this = T(T(*this) * v); }
  template <class U> Ref& operator/=(const U& v) { return *this = T(T(*this) / v); }
};
template <typename T, size_t N>
struct Shared : SharedBase {
  T data[N];
  explicit Shared(const char* nm) : SharedBase(nm, N) { poison(); }
  void poison() override { std::memset(static_cast<void*>(data), 0xff, sizeof(data)); }
  Ref<T> operator[](size_t i) {
    if (i >= N)
      fail("threadgroup %s[%zu] is out of bounds (%zu elements; thread %u after the sync at line %d)", name,
           i, N, cur->id, cur->last_line);
    return Ref<T>{this, i, &data[i]};
  }
};

// ---- the scheduler
struct Rng {  // splitmix64: a seeded order with no <random>
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  template <typename V> void shuffle(V& v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next() % i]);
  }
};
inline void (*entry)();
inline void fiber_main() {
  entry();
  cur->state = DONE;
}  // returns to uc_link: the scheduler

constexpr size_t STACK = 256 * 1024;
inline std::vector<char*> stacks;
inline char* stack(size_t i) {  // mmap'd, with a guard page below: an overflow faults
  while (stacks.size() <= i) {
    char* p = static_cast<char*>(mmap(nullptr, STACK + 4096, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (p == MAP_FAILED) fail("cannot map a fiber stack");
    mprotect(p, 4096, PROT_NONE);
    stacks.push_back(p + 4096);
  }
  return stacks[i];
}

inline bool same_site(const Fiber& a, const Fiber& b) {
  return a.line == b.line && a.syncs == b.syncs && std::strcmp(a.what, b.what) == 0 &&
         std::strcmp(a.file, b.file) == 0;
}
// A simd op of the lanes f[first .. first + count) (one simdgroup): every lane at the same call.
inline void resolve_simd(std::vector<Fiber>& f, size_t first, size_t count) {
  const Fiber* a = nullptr;
  for (size_t k = first; k < first + count; ++k) {
    if (f[k].state == AT_SIMD) { a = &f[k]; break; }
  }
  int at[32];  // lane -> index in f, or -1
  std::fill(at, at + 32, -1);
  for (size_t k = first; k < first + count; ++k) {
    const Fiber& b = f[k];
    at[b.lane] = int(k);
    if (b.state == DONE)
      fail("%s at %s:%d: lane %u of simdgroup %u (threadgroup (%u,%u,%u)) has returned while lane %u calls "
           "it: every lane must take part (CUDA's full-mask shuffles)", a->what, a->file, a->line, b.lane,
           a->simd, a->tgpig.x, a->tgpig.y, a->tgpig.z, a->lane);
    if (b.state != AT_SIMD || !same_site(*a, b))
      fail("divergent simd op in simdgroup %u of threadgroup (%u,%u,%u): lane %u is at %s (%s:%d, sync "
           "%llu), lane %u at %s (%s:%d, sync %llu): on a GPU each branch would combine only its own lanes",
           a->simd, a->tgpig.x, a->tgpig.y, a->tgpig.z, a->lane, a->what, a->file, a->line,
           (unsigned long long)a->syncs, b.lane, b.what, b.file, b.line, (unsigned long long)b.syncs);
  }
  const bool shuffle = std::strcmp(a->what, "simd_shuffle_xor") == 0;
  const bool sum = std::strcmp(a->what, "simd_sum") == 0, max = std::strcmp(a->what, "simd_max") == 0;
  float r = f[first].in;  // lanes in order
  for (size_t k = first + 1; k < first + count; ++k) {
    const float v = f[k].in;
    r = sum ? r + v : max ? std::max(r, v) : std::min(r, v);
  }
  for (size_t k = first; k < first + count; ++k) {
    const uint src = f[k].lane ^ f[k].mask;
    f[k].out = !shuffle ? r : src < 32 && at[src] >= 0 ? f[at[src]].in : std::nanf("");
    f[k].state = RUNNABLE;
    f[k].last_line = f[k].line;
    ++f[k].syncs;
  }
}

inline void run_group(std::vector<Fiber>& f, Rng& rng) {
  for (SharedBase* a : arrays) a->poison();
  group_epoch = ++epoch;
  std::vector<size_t> order;
  for (;;) {
    order.clear();
    for (size_t i = 0; i < f.size(); ++i)
      if (f[i].state == RUNNABLE) order.push_back(i);
    if (!order.empty()) {
      rng.shuffle(order);
      for (size_t i : order) {
        cur = &f[i];
        swapcontext(&sched, &f[i].uc);
      }
      continue;
    }
    bool progressed = false;  // simd ops: per simdgroup (lanes are consecutive ids)
    for (size_t s = 0, count = 0; s < f.size(); s += count) {
      for (count = 1; s + count < f.size() && f[s + count].simd == f[s].simd;) ++count;
      for (size_t k = s; k < s + count; ++k) {
        if (f[k].state == AT_SIMD) {
          resolve_simd(f, s, count);
          progressed = true;
          break;
        }
      }
    }
    if (progressed) continue;
    const Fiber* w = nullptr;  // every live thread at a barrier: the same one
    const Fiber* gone = nullptr;
    for (const Fiber& t : f) {
      if (t.state == DONE) { gone = &t; continue; }
      if (!w) w = &t;
      if (!same_site(t, *w))
        fail("divergent threadgroup_barrier in threadgroup (%u,%u,%u): thread %u at %s:%d (sync %llu), "
             "thread %u at %s:%d (sync %llu)", t.tgpig.x, t.tgpig.y, t.tgpig.z, w->id, w->file, w->line,
             (unsigned long long)w->syncs, t.id, t.file, t.line, (unsigned long long)t.syncs);
    }
    check_unwritten(f[0].tgpig);
    if (!w) return;  // all done
    if (gone)
      fail("thread %u of threadgroup (%u,%u,%u) has returned while thread %u waits at threadgroup_barrier "
           "(%s:%d): every thread must reach it", gone->id, w->tgpig.x, w->tgpig.y, w->tgpig.z, w->id,
           w->file, w->line);
    ++epoch;
    for (Fiber& t : f) { t.state = RUNNABLE; t.last_line = t.line; ++t.syncs; }
  }
}

// Runs entry() once per thread of the grid (grid counted in threads, as MLX's), one group at
// a time in an order drawn from seed.
inline void run_grid(uint3 grid, uint3 tg, void (*fn)(), uint64_t seed) {
  entry = fn;
  Rng rng{seed * 0x2545f4914f6cdd1dull + 1};
  std::vector<uint3> groups;
  for (uint bz = 0; bz * tg.z < grid.z; ++bz)
    for (uint by = 0; by * tg.y < grid.y; ++by)
      for (uint bx = 0; bx * tg.x < grid.x; ++bx) groups.push_back({bx, by, bz});
  std::vector<uint3> natural = groups;
  rng.shuffle(groups);
  const auto same = [](uint3 a, uint3 b) { return a.x == b.x && a.y == b.y && a.z == b.z; };
  if (groups.size() > 1 && std::equal(groups.begin(), groups.end(), natural.begin(), same))
    std::reverse(groups.begin(), groups.end());  // never the natural order
  std::vector<Fiber> f;
  for (const uint3 g : groups) {
    f.clear();
    for (uint z = 0; z < tg.z; ++z)
      for (uint y = 0; y < tg.y; ++y)
        for (uint x = 0; x < tg.x; ++x) {
          const uint3 p{g.x * tg.x + x, g.y * tg.y + y, g.z * tg.z + z};
          if (p.x >= grid.x || p.y >= grid.y || p.z >= grid.z) continue;
          Fiber t{};
          t.tpig = p;
          t.tpitg = {x, y, z};
          t.tgpig = g;
          t.tptg = tg;
          const uint linear = x + y * tg.x + z * tg.x * tg.y;
          t.lane = linear % 32;
          t.simd = linear / 32;
          t.id = linear;
          f.push_back(t);
        }
    for (size_t i = 0; i < f.size(); ++i) {
      getcontext(&f[i].uc);
      f[i].uc.uc_stack.ss_sp = stack(i);
      f[i].uc.uc_stack.ss_size = STACK;
      f[i].uc.uc_link = &sched;
      makecontext(&f[i].uc, fiber_main, 0);
    }
    run_group(f, rng);
  }
}
}  // namespace zmlx_emu

#define threadgroup_barrier(flags) zmlx_emu::barrier((flags), __FILE__, __LINE__)
#define simd_sum(v) zmlx_emu::simd("simd_sum", (v), 0u, __FILE__, __LINE__)
#define simd_max(v) zmlx_emu::simd("simd_max", (v), 0u, __FILE__, __LINE__)
#define simd_min(v) zmlx_emu::simd("simd_min", (v), 0u, __FILE__, __LINE__)
#define simd_shuffle_xor(v, m) zmlx_emu::simd("simd_shuffle_xor", (v), (m), __FILE__, __LINE__)
