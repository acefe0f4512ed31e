// Safetensors reader and writer: round trips of every dtype, the header layout the format
// requires, and each kind of corrupt header with the message that names it.
#include "client/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace nvfp4cal {
namespace {

using ::testing::HasSubstr;

std::string TempPath(const std::string& name) {
  const std::string dir = ::testing::TempDir() + "safetensors_test_" + std::to_string(getpid());
  std::filesystem::create_directories(dir);
  return dir + "/" + name;
}

// Writes 8-byte length + `header` (unpadded) + `data` verbatim.
std::string WriteRaw(const std::string& name, const std::string& header, size_t data_bytes) {
  const std::string path = TempPath(name);
  std::ofstream out(path, std::ios::binary);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>(n >> (8 * i)));
  out << header;
  out << std::string(data_bytes, '\x01');
  return path;
}

std::string OpenError(const std::string& path) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  EXPECT_FALSE(file.ok()) << path;
  return file.ok() ? "" : std::string(file.status().message());
}

TEST(Safetensors, RoundTripsEveryDtypeAndMetadata) {
  const std::vector<SafetensorsDType> dtypes = {SafetensorsDType::kBF16,   SafetensorsDType::kF16,
                                                SafetensorsDType::kF32,    SafetensorsDType::kU8,
                                                SafetensorsDType::kF8E4M3, SafetensorsDType::kI64};
  std::vector<SafetensorsTensorData> tensors;
  for (size_t i = 0; i < dtypes.size(); ++i) {
    SafetensorsTensorData t;
    t.spec = {"t" + std::to_string(i) + "." + std::string(SafetensorsDTypeName(dtypes[i])),
              dtypes[i],
              {3, static_cast<int64_t>(i) + 1}};
    t.bytes.resize(
        static_cast<size_t>(NumElements(t.spec.shape) * SafetensorsDTypeSize(dtypes[i])));
    for (size_t b = 0; b < t.bytes.size(); ++b) t.bytes[b] = static_cast<uint8_t>(b * 7 + i);
    tensors.push_back(std::move(t));
  }
  SafetensorsTensorData scalar;
  scalar.spec = {"scalar", SafetensorsDType::kF32, {}};
  const float value = 0.25f;
  scalar.bytes.resize(4);
  std::memcpy(scalar.bytes.data(), &value, 4);
  tensors.push_back(scalar);

  const std::string path = TempPath("roundtrip.safetensors");
  ASSERT_TRUE(WriteSafetensorsFile(path, tensors, {{"format", "pt"}}).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  ASSERT_EQ((*file)->tensors().size(), tensors.size());
  for (const SafetensorsTensorData& t : tensors) {
    const SafetensorsTensor* got = (*file)->Find(t.spec.name);
    ASSERT_NE(got, nullptr) << t.spec.name;
    EXPECT_EQ(got->dtype, t.spec.dtype);
    EXPECT_EQ(got->shape, t.spec.shape);
    ASSERT_EQ(got->num_bytes, static_cast<int64_t>(t.bytes.size()));
    EXPECT_EQ(std::memcmp(got->data, t.bytes.data(), t.bytes.size()), 0) << t.spec.name;
  }
  // The data buffer starts 8-byte aligned: the header length is padded to a multiple of 8.
  std::ifstream in(path, std::ios::binary);
  uint8_t len[8];
  in.read(reinterpret_cast<char*>(len), 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
  EXPECT_EQ(n % 8, 0u);
  // Offsets ascend in name order, starting at 0.
  EXPECT_EQ((*file)->tensors().front().file_offset, static_cast<int64_t>(8 + n));
  EXPECT_EQ((*file)->tensors().front().name, "scalar");
}

TEST(Safetensors, WriterAcceptsTensorsInAnyOrderAndChecksCompleteness) {
  const std::string path = TempPath("any_order.safetensors");
  auto writer = SafetensorsWriter::Create(
      path, {{"b", SafetensorsDType::kU8, {4}}, {"a", SafetensorsDType::kU8, {2}}}, {});
  ASSERT_TRUE(writer.ok()) << writer.status();
  const std::vector<uint8_t> b1 = {1, 2}, b2 = {3, 4}, a = {9, 8};
  ASSERT_TRUE((*writer)->Write("b", b1).ok());
  EXPECT_THAT(std::string((*writer)->Finish().message()), HasSubstr("'a' has 0 of 2 bytes"));
  ASSERT_TRUE((*writer)->Write("a", a).ok());
  ASSERT_TRUE((*writer)->Write("b", b2).ok());
  EXPECT_THAT(std::string((*writer)->Write("b", b2).message()), HasSubstr("overruns"));
  EXPECT_THAT(std::string((*writer)->Write("c", b2).message()), HasSubstr("no tensor 'c'"));
  ASSERT_TRUE((*writer)->Finish().ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(std::vector<uint8_t>((*file)->Find("b")->data, (*file)->Find("b")->data + 4),
            (std::vector<uint8_t>{1, 2, 3, 4}));
}

TEST(Safetensors, WriterRejectsDuplicateNames) {
  auto writer = SafetensorsWriter::Create(
      TempPath("dup.safetensors"),
      {{"a", SafetensorsDType::kU8, {1}}, {"a", SafetensorsDType::kU8, {1}}}, {});
  ASSERT_FALSE(writer.ok());
  EXPECT_THAT(std::string(writer.status().message()), HasSubstr("duplicate tensor name \"a\""));
}

TEST(Safetensors, MissingFileIsNotFound) {
  auto file = SafetensorsFile::Open(TempPath("nope.safetensors"));
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("nope.safetensors"));
}

// Opening a FIFO for reading blocks until a writer comes; the reader must refuse it at once.
// Should Open block, a helper thread opens the FIFO for writing after a few seconds so the test
// ends (and fails on the time taken).
TEST(Safetensors, FifoIsRefusedWithoutBlocking) {
  const std::string path = TempPath("fifo.safetensors");
  std::remove(path.c_str());
  ASSERT_EQ(mkfifo(path.c_str(), 0644), 0);
  std::atomic<bool> done{false};
  std::thread unblocker([&] {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
    while (!done.load() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    // Succeeds only while a reader is blocked in open(); then it lets that reader go on.
    while (!done.load()) {
      const int fd = ::open(path.c_str(), O_WRONLY | O_NONBLOCK);
      if (fd >= 0) ::close(fd);
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  });
  const auto start = std::chrono::steady_clock::now();
  auto file = SafetensorsFile::Open(path);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  done.store(true);
  unblocker.join();
  EXPECT_LT(seconds, 1.0) << "SafetensorsFile::Open blocked on a FIFO";
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(file.status().message()),
              HasSubstr(path + ": is a FIFO (named pipe), not a regular file"));
  std::remove(path.c_str());
}

TEST(Safetensors, FolderAndDeviceAreRefusedNamingTheType) {
  const std::string dir = TempPath("a_folder.safetensors");
  std::filesystem::create_directories(dir);
  EXPECT_THAT(OpenError(dir), HasSubstr(dir + ": is a directory, not a regular file"));
  EXPECT_THAT(OpenError("/dev/null"),
              HasSubstr("/dev/null: is a character device, not a regular file"));
}

TEST(SafetensorsCorruption, TooShortForTheLength) {
  const std::string path = TempPath("short.safetensors");
  std::ofstream(path) << "abc";
  EXPECT_THAT(OpenError(path), HasSubstr("shorter than the 8-byte header length"));
}

TEST(SafetensorsCorruption, HeaderLengthPastEndOfFile) {
  const std::string path = TempPath("len.safetensors");
  {
    std::ofstream out(path, std::ios::binary);
    const char len[8] = {static_cast<char>(0xff), 0x10, 0, 0, 0, 0, 0, 0};
    out.write(len, 8);
    out << "{}";
  }
  EXPECT_THAT(OpenError(path), HasSubstr("header length 4351 runs past the end"));
}

TEST(SafetensorsCorruption, HugeHeaderLength) {
  const std::string path = TempPath("huge.safetensors");
  {
    std::ofstream out(path, std::ios::binary);
    const char len[8] = {0, 0, 0, 0, 0, 0, 0, 0x10};
    out.write(len, 8);
    out << "{}";
  }
  EXPECT_THAT(OpenError(path), HasSubstr("exceeds the limit"));
}

TEST(SafetensorsCorruption, HeaderNotJson) {
  EXPECT_THAT(OpenError(WriteRaw("json.safetensors", "{\"a\": [1, 2", 0)),
              HasSubstr("header is not valid JSON"));
  EXPECT_THAT(OpenError(WriteRaw("brace.safetensors", "[1]", 0)),
              HasSubstr("does not start with '{'"));
}

TEST(SafetensorsCorruption, UnknownDtype) {
  const std::string message = OpenError(WriteRaw(
      "dtype.safetensors", R"({"w": {"dtype": "F12", "shape": [2], "data_offsets": [0, 4]}})", 4));
  EXPECT_THAT(message, HasSubstr("tensor 'w'"));
  EXPECT_THAT(message, HasSubstr("unknown dtype \"F12\""));
  EXPECT_THAT(message, HasSubstr("dtype.safetensors"));
}

TEST(SafetensorsCorruption, NegativeDimension) {
  EXPECT_THAT(
      OpenError(WriteRaw("neg.safetensors",
                         R"({"w": {"dtype": "U8", "shape": [-2], "data_offsets": [0, 2]}})", 2)),
      HasSubstr("tensor 'w': shape dimension -2 is not a non-negative integer"));
}

TEST(SafetensorsCorruption, SizeDoesNotMatchShape) {
  EXPECT_THAT(
      OpenError(WriteRaw("size.safetensors",
                         R"({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 10]}})",
                         10)),
      HasSubstr("tensor 'w': data_offsets [0, 10] hold 10 bytes but shape [2, 3] x BF16 needs 12"));
}

TEST(SafetensorsCorruption, MissingOffsets) {
  EXPECT_THAT(
      OpenError(WriteRaw("offsets.safetensors", R"({"w": {"dtype": "U8", "shape": [2]}})", 2)),
      HasSubstr("tensor 'w': \"data_offsets\" must be two non-negative integers"));
}

TEST(SafetensorsCorruption, EndBeforeBegin) {
  EXPECT_THAT(
      OpenError(WriteRaw("order.safetensors",
                         R"({"w": {"dtype": "U8", "shape": [0], "data_offsets": [4, 2]}})", 4)),
      HasSubstr("data_offsets [4, 2] end before begin"));
}

TEST(SafetensorsCorruption, OverlappingTensors) {
  const std::string message =
      OpenError(WriteRaw("overlap.safetensors",
                         R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                   "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}})",
                         6));
  EXPECT_THAT(message, HasSubstr("tensor 'b': data_offsets [2, 6] overlap tensor 'a'"));
}

TEST(SafetensorsCorruption, HoleBetweenTensors) {
  EXPECT_THAT(OpenError(WriteRaw("hole.safetensors",
                                 R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                                     "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}})",
                                 6)),
              HasSubstr("tensor 'b': data_offsets [4, 6] leave a hole of 2 bytes"));
}

TEST(SafetensorsCorruption, TruncatedData) {
  EXPECT_THAT(
      OpenError(WriteRaw("trunc.safetensors",
                         R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 10)),
      HasSubstr("tensor 'w': data_offsets [0, 16] end past the data buffer of 10 bytes"));
}

TEST(SafetensorsCorruption, TrailingBytes) {
  EXPECT_THAT(
      OpenError(WriteRaw("trail.safetensors",
                         R"({"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}})", 5)),
      HasSubstr("data buffer is 5 bytes but the tensors cover 2"));
}

TEST(SafetensorsCorruption, MetadataValueNotString) {
  EXPECT_THAT(OpenError(WriteRaw("meta.safetensors", R"({"__metadata__": {"n": 3}})", 0)),
              HasSubstr("__metadata__ value of \"n\" is not a string: 3"));
}

TEST(Safetensors, ReadsTheRealDevModel) {
  const std::string path = std::string(NVFP4CAL_DEV_LM_DIR) + "/model.safetensors";
  if (FILE* f = std::fopen(path.c_str(), "rb")) {
    std::fclose(f);
  } else {
    GTEST_SKIP() << "no dev-lm at " << NVFP4CAL_DEV_LM_DIR << " (set NVFP4CAL_DEV_LM_DIR)";
  }
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const SafetensorsTensor* w = (*file)->Find("model.layers.0.mlp.down_proj.weight");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->dtype, SafetensorsDType::kBF16);
  EXPECT_EQ(w->shape, (std::vector<int64_t>{192, 512}));
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
}

// Resident file-backed pages of this process (/proc/self/statm, third field: RssFile +
// RssShmem). Not the whole resident set: under AddressSanitizer the memcmp below also faults in
// the shadow of the mapping (anonymous, about 1/8 of it), which DropPages rightly leaves alone.
int64_t ResidentPages() {
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0;
  int64_t resident = 0;
  int64_t file_backed = 0;
  statm >> size >> resident >> file_backed;
  return file_backed;
}

TEST(Safetensors, DropPagesReleasesResidentMemoryAndKeepsTheData) {
  // 8 MiB of U8 with a pattern, then a small tensor sharing its last page.
  SafetensorsTensorData big{{"big", SafetensorsDType::kU8, {8 << 20}}, {}};
  big.bytes.resize(8 << 20);
  for (size_t i = 0; i < big.bytes.size(); ++i) big.bytes[i] = static_cast<uint8_t>(i * 7 + 3);
  SafetensorsTensorData small{{"small", SafetensorsDType::kU8, {100}},
                              std::vector<uint8_t>(100, 9)};
  const std::string path = TempPath("drop_pages.safetensors");
  ASSERT_TRUE(WriteSafetensorsFile(path, {big, small}, {}).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const SafetensorsTensor* t = (*file)->Find("big");
  ASSERT_NE(t, nullptr);

  const int64_t before = ResidentPages();
  EXPECT_EQ(std::memcmp(t->data, big.bytes.data(), big.bytes.size()), 0);  // touches every page
  const int64_t touched = ResidentPages();
  EXPECT_GE(touched - before, 1500);  // 2048 pages of 4 KiB (fewer if pages are larger)
  (*file)->DropPages(t->data, t->num_bytes);
  EXPECT_LE(ResidentPages(), before + 16);
  // Read again from the page cache: the same bytes, the neighbour too.
  EXPECT_EQ(std::memcmp(t->data, big.bytes.data(), big.bytes.size()), 0);
  const SafetensorsTensor* s = (*file)->Find("small");
  EXPECT_EQ(std::vector<uint8_t>(s->data, s->data + s->num_bytes), small.bytes);

  // Memory that is not the file's mapping is left alone (MADV_DONTNEED would zero it).
  std::vector<uint8_t> heap(1 << 20, 5);
  (*file)->DropPages(heap.data(), static_cast<int64_t>(heap.size()));
  EXPECT_EQ(heap, std::vector<uint8_t>(1 << 20, 5));
  (*file)->DropPages(t->data + t->num_bytes - 10, 1 << 30);  // runs past the mapping: ignored
  EXPECT_EQ(std::vector<uint8_t>(s->data, s->data + s->num_bytes), small.bytes);
}

}  // namespace
}  // namespace nvfp4cal
