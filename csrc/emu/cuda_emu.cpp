// The CUDA emulator's scheduler, barriers, warp collectives, shared memory and launch checks
// (see cuda_emu.h).
#include "emu/cuda_emu.h"
#include "emu/wmma.h"

#include <c10/util/Exception.h>
#include <torch/library.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <vector>

namespace pyseg {
namespace emu {

thread_local ThreadCtx* tls_thread = nullptr;

namespace {

// H100 SXM limits (the launchers plan shared memory with these; sm_90's opt-in is 227 KB).
constexpr size_t kSmemDefault = 48 * 1024;
constexpr size_t kSmemOptin = 227 * 1024;
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;

enum class State { kReady, kBarrier, kWarp, kDone };

struct Thread {
  ucontext_t ctx;
  ThreadCtx tc;
  State state = State::kReady;
  int linear = 0;
  const char* site_file = nullptr;  // barrier / warp-op call site
  int site_line = 0;
  // warp op
  int wkind = 0, warg = 0, wwidth = 32, wpred = 0, wbytes = 0;
  unsigned wmask = 0;
  unsigned char wval[8] = {0};
  unsigned long long wresult = 0;
  void (*whook)(void* const*) = nullptr;  // warp collective (kind 8): runs once all lanes have arrived
  void* wpayload = nullptr;
  std::string error;
};

struct Emulator {
  std::mutex mu;  // one launch at a time
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;
  std::set<std::string> disabled;  // "file:line" of barriers that act as no-ops
  std::vector<std::string> launched;
  std::set<std::string> barrier_sites;
  int64_t barriers = 0;
  std::map<const void*, int> max_dyn_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize
  // per-launch state
  ucontext_t sched;
  std::vector<Thread> threads;
  std::vector<void*> stacks;
  Thread* running = nullptr;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  // dynamic shared memory with a guard page after it and a canary before it
  unsigned char* smem_map = nullptr;
  size_t smem_map_bytes = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::string fault;
};

Emulator& E() {
  static Emulator e;
  return e;
}

std::string site_name(const char* file, int line) {
  std::string f = file ? file : "?";
  const size_t slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(line);
}

std::string thread_name(const Thread& t) {
  std::ostringstream os;
  os << "block (" << t.tc.bid.x << "," << t.tc.bid.y << "," << t.tc.bid.z << ") thread (" << t.tc.tid.x << ","
     << t.tc.tid.y << "," << t.tc.tid.z << ")";
  return os.str();
}

void yield_to_scheduler(Thread* t) { swapcontext(&t->ctx, &E().sched); }

void fiber_entry() {
  Emulator& e = E();
  Thread* t = e.running;
  try {
    e.body(e.arg);
  } catch (const std::exception& ex) {
    t->error = ex.what();
  } catch (...) {
    t->error = "unknown exception";
  }
  t->state = State::kDone;
  // returning resumes uc_link (the scheduler)
}

// SIGSEGV/SIGBUS inside the guard page of the dynamic shared memory: an out-of-bounds access.
struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* info, void* uctx) {
  Emulator& e = E();
  auto* addr = static_cast<unsigned char*>(info->si_addr);
  const bool in_guard = e.smem_map && addr >= e.smem + e.smem_bytes && addr < e.smem_map + e.smem_map_bytes;
  if (!in_guard || e.running == nullptr) {
    // not ours: restore the previous handler and let the fault happen again
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    return;
  }
  std::ostringstream os;
  os << "out-of-bounds dynamic shared memory access at byte " << (addr - e.smem) << " of a " << e.smem_bytes
     << "-byte allocation by " << thread_name(*e.running);
  e.fault = os.str();
  e.running->state = State::kDone;
  setcontext(&e.sched);  // back to the scheduler (restores its signal mask)
}

void* new_stack() {
  void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "CUDA emulator: cannot map a thread stack");
  mprotect(p, 4096, PROT_NONE);  // stack overflow guard
  return p;
}

void map_smem(size_t bytes) {
  Emulator& e = E();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t body = (bytes + page - 1) / page * page + page;  // >= one page of canary before the data
  e.smem_map_bytes = body + page;
  void* p = mmap(nullptr, e.smem_map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "CUDA emulator: cannot map shared memory");
  e.smem_map = static_cast<unsigned char*>(p);
  mprotect(e.smem_map + body, page, PROT_NONE);
  // the data ends at the guard page when its size is a multiple of 128 bytes (the start is 128-byte aligned,
  // as extern __shared__ __align__(128); wmma needs 32); a tail below 128 is checked as a canary
  e.smem = e.smem_map + ((body - bytes) & ~static_cast<size_t>(127));
  e.smem_bytes = bytes;
}

void unmap_smem() {
  Emulator& e = E();
  if (e.smem_map) munmap(e.smem_map, e.smem_map_bytes);
  e.smem_map = nullptr;
  e.smem = nullptr;
  e.smem_bytes = 0;
}

constexpr unsigned char kPoison = 0xFF;  // NaN in every float format

void check_canary(const LaunchInfo& info, dim3 bid) {
  Emulator& e = E();
  for (unsigned char* p = e.smem_map; p < e.smem; ++p)
    TORCH_CHECK(*p == kPoison, "CUDA emulator: kernel ", info.expr, " wrote to dynamic shared memory ",
                (e.smem - p), " bytes before its start in block (", bid.x, ",", bid.y, ",", bid.z, ")");
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  for (unsigned char* p = e.smem + e.smem_bytes; p < e.smem_map + e.smem_map_bytes - page; ++p)
    TORCH_CHECK(*p == kPoison, "CUDA emulator: kernel ", info.expr, " wrote to dynamic shared memory at byte ",
                (p - e.smem), " of a ", e.smem_bytes, "-byte allocation in block (", bid.x, ",", bid.y, ",", bid.z,
                ")");
}

[[noreturn]] void fail_block(const std::string& what) { TORCH_CHECK(false, "CUDA emulator: ", what); }

// Completes the warp collectives whose lanes have all arrived; returns whether any did.
bool resolve_warps(std::vector<Thread>& th) {
  bool any = false;
  const int n = static_cast<int>(th.size());
  for (int w0 = 0; w0 < n; w0 += kWarp) {
    const int lanes = std::min(kWarp, n - w0);
    int first = -1;
    for (int l = 0; l < lanes; ++l)
      if (th[w0 + l].state == State::kWarp) {
        first = l;
        break;
      }
    if (first < 0) continue;
    const Thread& f = th[w0 + first];
    const unsigned mask = f.wmask;
    bool complete = true;
    for (int l = 0; l < kWarp; ++l) {
      const bool in_mask = (mask >> l) & 1u;
      if (!in_mask) {
        if (l < lanes && th[w0 + l].state == State::kWarp && th[w0 + l].wmask == mask)
          fail_block("lane " + std::to_string(l) + " of " + thread_name(th[w0 + l]) + "'s warp is not in its own mask");
        continue;
      }
      if (l >= lanes)
        fail_block("warp operation at " + site_name(f.site_file, f.site_line) + " names lane " + std::to_string(l) +
                   " in its mask, which does not exist (block of " + std::to_string(n) + " threads)");
      const Thread& t = th[w0 + l];
      if (t.state == State::kDone)
        fail_block("warp operation at " + site_name(f.site_file, f.site_line) + " waits for lane " +
                   std::to_string(l) + ", which has exited (" + thread_name(t) + ")");
      if (t.state != State::kWarp) {
        complete = false;
        continue;
      }
      if (t.wmask != mask || t.wkind != f.wkind || t.site_line != f.site_line || t.site_file != f.site_file)
        fail_block("lanes of one warp meet at different warp operations: " + site_name(f.site_file, f.site_line) +
                   " and " + site_name(t.site_file, t.site_line) + " (" + thread_name(t) + ")");
    }
    if (!complete) continue;
    if (f.wkind == 8) {  // a tensor-core (wmma) call: the hook does the whole warp's work
      void* payloads[kWarp];
      for (int l = 0; l < kWarp; ++l) {
        if (th[w0 + l].whook != f.whook)
          fail_block("lanes of one warp meet at different wmma calls at " + site_name(f.site_file, f.site_line));
        payloads[l] = th[w0 + l].wpayload;
      }
      f.whook(payloads);
      for (int l = 0; l < kWarp; ++l) th[w0 + l].state = State::kReady;
      any = true;
      continue;
    }
    // compute
    unsigned long long ballot = 0;
    for (int l = 0; l < lanes; ++l)
      if (((mask >> l) & 1u) && th[w0 + l].wpred) ballot |= 1ull << l;
    std::vector<unsigned char> vals(static_cast<size_t>(kWarp) * 8);
    for (int l = 0; l < lanes; ++l) std::memcpy(&vals[l * 8], th[w0 + l].wval, 8);
    for (int l = 0; l < lanes; ++l) {
      Thread& t = th[w0 + l];
      if (!((mask >> l) & 1u)) continue;
      const int width = t.wwidth, base = (l / width) * width;
      int src = l;
      switch (t.wkind) {
        case 0: src = base + ((t.warg % width) + width) % width; break;
        case 1: src = (l - t.warg >= base) ? l - t.warg : l; break;
        case 2: src = (l + t.warg < base + width) ? l + t.warg : l; break;
        case 3: src = ((l ^ t.warg) < base + width && (l ^ t.warg) >= base) ? (l ^ t.warg) : l; break;
        default: break;
      }
      if (t.wkind <= 3) {
        if (src >= lanes || !((mask >> src) & 1u))
          fail_block("shuffle at " + site_name(t.site_file, t.site_line) + " reads lane " + std::to_string(src) +
                     ", which is not in the mask");
        std::memcpy(t.wval, &vals[src * 8], 8);
      } else if (t.wkind == 4) {
        t.wresult = (ballot == (mask & ((lanes == 32) ? 0xffffffffull : ((1ull << lanes) - 1)))) ? 1 : 0;
      } else if (t.wkind == 5) {
        t.wresult = ballot ? 1 : 0;
      } else if (t.wkind == 6) {
        t.wresult = ballot;
      }
      t.state = State::kReady;
    }
    any = true;
  }
  return any;
}

void run_block(const LaunchInfo& info, dim3 bid, std::mt19937_64& rng) {
  Emulator& e = E();
  const int n = static_cast<int>(info.block.x * info.block.y * info.block.z);
  auto& th = e.threads;
  th.assign(n, Thread());
  while (static_cast<int>(e.stacks.size()) < n) e.stacks.push_back(new_stack());
  if (e.smem) std::memset(e.smem_map, kPoison, e.smem_map_bytes - static_cast<size_t>(sysconf(_SC_PAGESIZE)));
  for (int i = 0; i < n; ++i) {
    Thread& t = th[i];
    t.linear = i;
    t.tc.tid = uint3{static_cast<unsigned>(i % info.block.x), static_cast<unsigned>((i / info.block.x) % info.block.y),
                     static_cast<unsigned>(i / (info.block.x * info.block.y))};
    t.tc.bid = uint3{bid.x, bid.y, bid.z};
    t.tc.bdim = info.block;
    t.tc.gdim = info.grid;
    t.tc.dyn_smem = e.smem;
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = e.stacks[i];
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = &e.sched;
    makecontext(&t.ctx, fiber_entry, 0);
  }
  std::vector<int> order(n);
  const char* bar_file = nullptr;
  int bar_line = 0;
  while (true) {
    order.clear();
    for (int i = 0; i < n; ++i)
      if (th[i].state == State::kReady) order.push_back(i);
    if (!order.empty()) {
      if (e.schedule == Schedule::kReverse) {
        std::reverse(order.begin(), order.end());
      } else if (e.schedule == Schedule::kShuffled) {
        std::shuffle(order.begin(), order.end(), rng);
      }
      for (int i : order) {
        Thread& t = th[i];
        e.running = &t;
        tls_thread = &t.tc;
        swapcontext(&e.sched, &t.ctx);
        e.running = nullptr;
        tls_thread = nullptr;
        if (!e.fault.empty()) {
          const std::string f = e.fault;
          e.fault.clear();
          fail_block(f + " in kernel " + info.expr);
        }
        if (!t.error.empty()) fail_block(t.error + " (" + thread_name(t) + " of kernel " + info.expr + ")");
      }
      continue;
    }
    if (resolve_warps(th)) continue;
    int done = 0, at_bar = 0, at_warp = 0;
    for (const Thread& t : th) {
      done += t.state == State::kDone;
      at_bar += t.state == State::kBarrier;
      at_warp += t.state == State::kWarp;
    }
    if (done == n) break;
    if (at_warp > 0) {
      for (const Thread& t : th)
        if (t.state == State::kWarp)
          fail_block("deadlock in kernel " + std::string(info.expr) + ": " + thread_name(t) +
                     " waits at the warp operation at " + site_name(t.site_file, t.site_line) +
                     " for lanes that wait at a __syncthreads()");
    }
    // every live thread waits at a barrier
    bar_file = nullptr;
    for (const Thread& t : th) {
      if (t.state != State::kBarrier) continue;
      if (bar_file == nullptr) {
        bar_file = t.site_file;
        bar_line = t.site_line;
      } else if (t.site_line != bar_line || t.site_file != bar_file) {
        fail_block("divergent __syncthreads() in kernel " + std::string(info.expr) + ": threads of block (" +
                   std::to_string(bid.x) + "," + std::to_string(bid.y) + "," + std::to_string(bid.z) +
                   ") wait at " + site_name(bar_file, bar_line) + " and at " + site_name(t.site_file, t.site_line));
      }
    }
    if (done > 0)
      fail_block("__syncthreads() at " + site_name(bar_file, bar_line) + " in kernel " + std::string(info.expr) +
                 " is reached by " + std::to_string(at_bar) + " of the " + std::to_string(n) +
                 " threads of block (" + std::to_string(bid.x) + "," + std::to_string(bid.y) + "," +
                 std::to_string(bid.z) + "); " + std::to_string(done) + " have exited (deadlock on a GPU)");
    ++e.barriers;
    for (Thread& t : th) t.state = State::kReady;
  }
  if (e.smem) check_canary(info, bid);
}

}  // namespace

const cudaDeviceProp& device_props() {
  static const cudaDeviceProp p{kSmemDefault, kSmemOptin, 132, 1024, 32};
  return p;
}

void syncthreads(const char* file, int line) {
  Emulator& e = E();
  Thread* t = e.running;
  TORCH_CHECK(t != nullptr, "CUDA emulator: __syncthreads() outside a kernel");
  if (!e.disabled.empty() && e.disabled.count(site_name(file, line))) return;
  e.barrier_sites.insert(site_name(file, line));
  t->state = State::kBarrier;
  t->site_file = file;
  t->site_line = line;
  yield_to_scheduler(t);
  tls_thread = &t->tc;
}

unsigned long long warp_op(int kind, unsigned mask, void* value, int nbytes, int arg, int width, int pred,
                           const char* file, int line) {
  Emulator& e = E();
  Thread* t = e.running;
  TORCH_CHECK(t != nullptr, "CUDA emulator: warp operation outside a kernel");
  TORCH_CHECK(width >= 1 && width <= 32 && (width & (width - 1)) == 0, "CUDA emulator: shuffle width ", width,
              " is not a power of two <= 32 at ", site_name(file, line));
  t->state = State::kWarp;
  t->wkind = kind;
  t->wmask = mask;
  t->warg = arg;
  t->wwidth = width;
  t->wpred = pred;
  t->wbytes = nbytes;
  std::memset(t->wval, 0, 8);
  if (nbytes) std::memcpy(t->wval, value, nbytes);
  t->site_file = file;
  t->site_line = line;
  yield_to_scheduler(t);
  tls_thread = &t->tc;
  if (nbytes) std::memcpy(value, t->wval, nbytes);
  return t->wresult;
}

void warp_collective(void (*hook)(void* const* lanes), void* payload, const char* file, int line) {
  Emulator& e = E();
  Thread* t = e.running;
  TORCH_CHECK(t != nullptr, "CUDA emulator: wmma call outside a kernel");
  t->whook = hook;
  t->wpayload = payload;
  warp_op(8, 0xffffffffu, nullptr, 0, 0, 32, 0, file, line);
  t->whook = nullptr;
  t->wpayload = nullptr;
}

void set_max_dynamic_smem(const void* fn, int bytes) {
  TORCH_CHECK(bytes >= 0 && static_cast<size_t>(bytes) <= kSmemOptin,
              "CUDA emulator: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, ", bytes,
              ") exceeds the opt-in limit of ", kSmemOptin, " bytes (invalid argument)");
  std::lock_guard<std::mutex> g(E().mu);
  E().max_dyn_smem[fn] = bytes;
}

void run_grid(const LaunchInfo& info, void (*body)(void*), void* arg) {
  Emulator& e = E();
  std::lock_guard<std::mutex> g(e.mu);
  const std::string name = info.expr;
  const unsigned threads = info.block.x * info.block.y * info.block.z;
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreads && info.block.x <= 1024 && info.block.y <= 1024 &&
                  info.block.z <= 64,
              "CUDA emulator: launch of ", name, " with block (", info.block.x, ",", info.block.y, ",", info.block.z,
              "): at most 1024 threads per block (x, y <= 1024, z <= 64)");
  TORCH_CHECK(info.grid.x >= 1 && info.grid.y >= 1 && info.grid.z >= 1 && info.grid.x <= 2147483647u &&
                  info.grid.y <= 65535 && info.grid.z <= 65535,
              "CUDA emulator: launch of ", name, " with grid (", info.grid.x, ",", info.grid.y, ",", info.grid.z,
              "): grid.x must be in [1, 2^31-1], grid.y and grid.z in [1, 65535]");
  size_t limit = kSmemDefault;
  const auto it = e.max_dyn_smem.find(info.fn);
  if (it != e.max_dyn_smem.end()) limit = std::max(limit, static_cast<size_t>(it->second));
  TORCH_CHECK(info.smem <= limit, "CUDA emulator: launch of ", name, " with ", info.smem,
              " bytes of dynamic shared memory; the limit is ", limit, " bytes",
              limit == kSmemDefault ? " (more needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize) first)" : "");
  e.launched.push_back(name + "|" + info.pretty);
  e.body = body;
  e.arg = arg;
  if (info.smem > 0) map_smem(info.smem);
  struct sigaction sa {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
  std::mt19937_64 rng(e.seed);
  try {
    for (unsigned z = 0; z < info.grid.z; ++z)
      for (unsigned y = 0; y < info.grid.y; ++y)
        for (unsigned x = 0; x < info.grid.x; ++x) run_block(info, dim3(x, y, z), rng);
  } catch (...) {
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    unmap_smem();
    e.threads.clear();
    throw;
  }
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaction(SIGBUS, &g_old_bus, nullptr);
  unmap_smem();
  e.threads.clear();
}

void set_schedule(int schedule, int64_t seed) {
  TORCH_CHECK(schedule >= 0 && schedule <= 2, "CUDA emulator: schedule must be 0 (forward), 1 (reverse) or 2 (shuffled)");
  std::lock_guard<std::mutex> g(E().mu);
  E().schedule = static_cast<Schedule>(schedule);
  E().seed = static_cast<uint64_t>(seed);
}

void disable_barrier(const std::string& site) {
  std::lock_guard<std::mutex> g(E().mu);
  if (site.empty())
    E().disabled.clear();
  else
    E().disabled.insert(site);
}

// The names in a container, one a line.
template <typename Names>
std::string one_a_line(const Names& names) {
  std::string out;
  for (const auto& s : names) out += s + "\n";
  return out;
}

std::string launched() {
  std::lock_guard<std::mutex> g(E().mu);
  return one_a_line(E().launched);
}

void clear_launched() {
  std::lock_guard<std::mutex> g(E().mu);
  E().launched.clear();
  E().barrier_sites.clear();
  E().barriers = 0;
}

std::string barrier_sites() {
  std::lock_guard<std::mutex> g(E().mu);
  return one_a_line(E().barrier_sites);
}

int64_t barrier_count() {
  std::lock_guard<std::mutex> g(E().mu);
  return E().barriers;
}

}  // namespace emu
}  // namespace pyseg

namespace nvcuda {
namespace wmma {
namespace detail {
void fail(const char* what, const char* file, int line, const std::string& why) {
  TORCH_CHECK(false, "CUDA emulator: ", what, " at ", pyseg::emu::site_name(file, line), ": ", why);
}
void collective(void (*hook)(void* const* lanes), void* payload, const char* file, int line) {
  pyseg::emu::warp_collective(hook, payload, file, line);
}
}  // namespace detail
}  // namespace wmma
}  // namespace nvcuda

// ---------------------------------------------------------------------------------------------
// Control ops for the tests: torch.ops.pyseg_emu.*
// ---------------------------------------------------------------------------------------------
namespace {
void emu_set_schedule(int64_t schedule, int64_t seed) { pyseg::emu::set_schedule(static_cast<int>(schedule), seed); }
void emu_disable_barrier(std::string site) { pyseg::emu::disable_barrier(site); }
std::string emu_launched() { return pyseg::emu::launched(); }
void emu_clear() { pyseg::emu::clear_launched(); }
std::string emu_barrier_sites() { return pyseg::emu::barrier_sites(); }
int64_t emu_barrier_count() { return pyseg::emu::barrier_count(); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(pyseg_emu, m) {
  m.def("set_schedule(int schedule, int seed) -> ()", &emu_set_schedule);
  m.def("disable_barrier(str site) -> ()", &emu_disable_barrier);
  m.def("launched() -> str", &emu_launched);
  m.def("clear() -> ()", &emu_clear);
  m.def("barrier_sites() -> str", &emu_barrier_sites);
  m.def("barrier_count() -> int", &emu_barrier_count);
}
