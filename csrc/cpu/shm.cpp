// Shared-memory primitives for the single-host pipeline transport (overlap/shm.py).
//
// Everything here works on raw addresses inside a MAP_SHARED mapping that Python owns
// (overlap/shm.py keeps the mapping alive as long as any address into it is used):
//
// * a single-producer single-consumer byte ring: `head` (bytes ever written, by the
//   producer) and `tail` (bytes ever consumed, by the consumer) on their own cache lines,
//   then `capacity` data bytes.  The producer copies, then publishes `head` with a release
//   store; the consumer loads `head` with acquire, copies, then publishes `tail` with
//   release.  So on any CPU (x86 or ARM) data is visible before the counter that covers it.
// * a "bell": a 32-bit futex word a process sleeps on, plus a sleeper count, so waking
//   costs a system call only when someone sleeps.  Futexes on shared mappings work across
//   processes (no FUTEX_PRIVATE_FLAG).
//
// Framing, matching of messages to receives, timeouts and failures are Python's business.
#include "cpu/dp_cpu.h"

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <ctime>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#define DP_HAVE_FUTEX 1
#else
#define DP_HAVE_FUTEX 0
#include <thread>
#endif

namespace dp_cpu {
namespace {

constexpr int64_t kHeadOffset = 0;
constexpr int64_t kTailOffset = 64;

std::atomic<uint64_t>* word64(int64_t addr) {
  return reinterpret_cast<std::atomic<uint64_t>*>(static_cast<uintptr_t>(addr));
}

std::atomic<uint32_t>* word32(int64_t addr) {
  return reinterpret_cast<std::atomic<uint32_t>*>(static_cast<uintptr_t>(addr));
}

char* data_of(int64_t ring) { return reinterpret_cast<char*>(static_cast<uintptr_t>(ring + kRingHeaderBytes)); }

}  // namespace

bool shm_supported() { return DP_HAVE_FUTEX != 0; }

int64_t ring_write(int64_t ring, int64_t capacity, int64_t src, int64_t nbytes, bool all_or_nothing) {
  auto* head = word64(ring + kHeadOffset);
  auto* tail = word64(ring + kTailOffset);
  const uint64_t h = head->load(std::memory_order_relaxed);  // only this process writes it
  const uint64_t t = tail->load(std::memory_order_acquire);
  const int64_t space = capacity - static_cast<int64_t>(h - t);
  int64_t n = nbytes < space ? nbytes : space;
  if (n <= 0 || (all_or_nothing && n < nbytes)) return 0;
  const int64_t at = static_cast<int64_t>(h % static_cast<uint64_t>(capacity));
  const int64_t first = n < capacity - at ? n : capacity - at;
  const char* s = reinterpret_cast<const char*>(static_cast<uintptr_t>(src));
  std::memcpy(data_of(ring) + at, s, static_cast<size_t>(first));
  if (n > first) std::memcpy(data_of(ring), s + first, static_cast<size_t>(n - first));
  head->store(h + static_cast<uint64_t>(n), std::memory_order_release);
  return n;
}

int64_t ring_read(int64_t ring, int64_t capacity, int64_t dst, int64_t nbytes) {
  auto* head = word64(ring + kHeadOffset);
  auto* tail = word64(ring + kTailOffset);
  const uint64_t t = tail->load(std::memory_order_relaxed);  // only this process writes it
  const uint64_t h = head->load(std::memory_order_acquire);
  const int64_t avail = static_cast<int64_t>(h - t);
  const int64_t n = nbytes < avail ? nbytes : avail;
  if (n <= 0) return 0;
  const int64_t at = static_cast<int64_t>(t % static_cast<uint64_t>(capacity));
  const int64_t first = n < capacity - at ? n : capacity - at;
  char* d = reinterpret_cast<char*>(static_cast<uintptr_t>(dst));
  std::memcpy(d, data_of(ring) + at, static_cast<size_t>(first));
  if (n > first) std::memcpy(d + first, data_of(ring), static_cast<size_t>(n - first));
  tail->store(t + static_cast<uint64_t>(n), std::memory_order_release);
  return n;
}

int64_t ring_available(int64_t ring) {
  const uint64_t t = word64(ring + kTailOffset)->load(std::memory_order_relaxed);
  const uint64_t h = word64(ring + kHeadOffset)->load(std::memory_order_acquire);
  return static_cast<int64_t>(h - t);
}

int64_t load_acquire(int64_t addr) {
  return static_cast<int64_t>(word64(addr)->load(std::memory_order_acquire));
}

void store_release(int64_t addr, int64_t value) {
  word64(addr)->store(static_cast<uint64_t>(value), std::memory_order_release);
}

int64_t fetch_add(int64_t addr, int64_t value) {
  return static_cast<int64_t>(word64(addr)->fetch_add(static_cast<uint64_t>(value)));
}

int64_t bell_value(int64_t bell) { return word32(bell)->load(std::memory_order_seq_cst); }

void bell_ring(int64_t bell) {
  word32(bell)->fetch_add(1, std::memory_order_seq_cst);
  if (word32(bell + 4)->load(std::memory_order_seq_cst) == 0) return;  // nobody sleeps
#if DP_HAVE_FUTEX
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(static_cast<uintptr_t>(bell)), FUTEX_WAKE, INT_MAX,
          nullptr, nullptr, 0);
#endif
}

bool bell_wait(int64_t bell, int64_t seen, int64_t timeout_us) {
  auto* word = word32(bell);
  auto* sleepers = word32(bell + 4);
  sleepers->fetch_add(1, std::memory_order_seq_cst);
  bool changed = word->load(std::memory_order_seq_cst) != static_cast<uint32_t>(seen);
  if (!changed && timeout_us > 0) {
#if DP_HAVE_FUTEX
    struct timespec ts;
    ts.tv_sec = static_cast<time_t>(timeout_us / 1000000);
    ts.tv_nsec = static_cast<long>((timeout_us % 1000000) * 1000);
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, static_cast<uint32_t>(seen), &ts,
            nullptr, 0);
#else
    std::this_thread::sleep_for(std::chrono::microseconds(timeout_us < 200 ? timeout_us : 200));
#endif
    changed = word->load(std::memory_order_seq_cst) != static_cast<uint32_t>(seen);
  }
  sleepers->fetch_sub(1, std::memory_order_seq_cst);
  return changed;
}

}  // namespace dp_cpu
