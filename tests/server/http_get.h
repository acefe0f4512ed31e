// A metrics scrape for tests: plain HTTP/1.0 GET of /metrics on 127.0.0.1, no dependencies.
#ifndef NVFP4CAL_TESTS_SERVER_HTTP_GET_H_
#define NVFP4CAL_TESTS_SERVER_HTTP_GET_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

namespace nvfp4cal::server::testing {

// Plain HTTP/1.0 GET of /metrics.
inline std::string Scrape(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(fd);
    return "";
  }
  const std::string get = "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n";
  if (write(fd, get.data(), get.size()) != static_cast<ssize_t>(get.size())) {
    close(fd);
    return "";
  }
  std::string body;
  char buffer[4096];
  for (ssize_t n; (n = read(fd, buffer, sizeof(buffer))) > 0;) {
    body.append(buffer, static_cast<size_t>(n));
  }
  close(fd);
  return body;
}

// The value of the series `name{labels}` (exactly as exposed) in a Prometheus text page, or -1.
inline double MetricValue(const std::string& text, const std::string& series) {
  const size_t at = text.find("\n" + series + " ");
  if (at == std::string::npos) return -1.0;
  return std::strtod(text.c_str() + at + series.size() + 2, nullptr);
}

}  // namespace nvfp4cal::server::testing

#endif  // NVFP4CAL_TESTS_SERVER_HTTP_GET_H_
