#pragma once
// Crop + blur + resize of many boxes of one RGB image in one call (no Python headers here).
//
// Per box (x1, y1, x2, y2 in pixels; pixel i covers [i, i + 1)):
//   1. clip the box to the image; the sharp rectangle is [floor(x1), ceil(x2)) x [floor(y1), ceil(y2)).
//   2. enlarge around the clipped box's centre by s (fixed, or adaptive:
//        s = clamp(sqrt(kAdaptiveTargetArea / a), kAdaptiveMinScale, kAdaptiveMaxScale),
//      a = clipped box area / image area), clip to the image, round outwards to whole pixels: the crop.
//   3. Gaussian blur with standard deviation sigma (source pixels) of the crop outside the sharp rectangle,
//      computed as Pillow's ImageFilter.GaussianBlur does: three extended box filters per axis, edge
//      pixels replicated; the sharp rectangle keeps its pixels.
//   4. resize (antialiased triangle filter, as Pillow's BILINEAR) to out x out (stretch) or, letterboxed,
//      to fit inside out x out with the aspect kept, centred on pad_value.
// When the crop has more pixels than the resized result, the crop is resized first and blurred with sigma
// scaled by the resize factor per axis (its own edge rows / columns, resized, extend it for the first blur
// pass), and the sharp rectangle's edge pixels are blended by how much of them the rectangle covers:
// cheaper, and within 36 dB PSNR of the order above on the COCO128 photos (see tests/test_boxes.py).
#include <cstddef>
#include <cstdint>
#include <string>

namespace rar {

constexpr double kAdaptiveTargetArea = 0.05;
constexpr double kAdaptiveMinScale = 1.25;
constexpr double kAdaptiveMaxScale = 3.0;
constexpr double kMaxSigma = 256.0;
constexpr int kMaxOutSize = 8192;
constexpr double kMaxCropScale = 64.0;

struct CropParams {
  int out_size = 224;
  double crop_scale = 1.5;
  bool adaptive = false;
  double sigma = 4.0;
  bool letterbox = false;
  uint8_t pad_value = 0;
};

// Checks one box against an h x w image; false with a reason when it is NaN/inf, has no area or lies
// outside the image.
bool check_box(const double* box, int h, int w, std::string* reason);

// image: h x w x 3 uint8, C-contiguous. boxes: n x 4 doubles, all passing check_box.
// out: n x out_size x out_size x 3 uint8.
void crop_blur(const uint8_t* image, int h, int w, const double* boxes, std::size_t n, const CropParams& params,
               int threads, uint8_t* out);

}  // namespace rar
