# nvfp4cal_include_folder(TARGET <PUBLIC|PRIVATE|INTERFACE> FOLDER...): TARGET (and, PUBLIC or
# INTERFACE, every target linking it) may include the headers of FOLDER as "FOLDER/x.h", and
# nothing else of the source tree.
#
# Headers are included by their path from the project root ("server/scheduler.h"), but the root
# itself on the include path would let any target include any folder's headers, whatever it
# links. So each folder gets an include root of its own in the build tree, holding one symbolic
# link to the folder:
#
#   ${PROJECT_BINARY_DIR}/include-roots/server/server -> ${PROJECT_SOURCE_DIR}/server
#
# A library puts its folder's root on its PUBLIC include path (libraries of one folder share it),
# so a target sees "server/x.h" only when it links a server library: the compiler, not habit,
# keeps the client out of server/ and kernels/ out of both (tests/layering proves it). Headers
# stay where they are, and edits to them are seen at once: the link is to the folder, not a copy.
# Test programs use it PRIVATE for their helpers ("tests/client/test_util.h").
function(nvfp4cal_include_folder target scope)
  if(NOT scope MATCHES "^(PUBLIC|PRIVATE|INTERFACE)$")
    message(FATAL_ERROR "nvfp4cal_include_folder(${target} ${scope} ...): the second argument "
      "is PUBLIC, PRIVATE or INTERFACE")
  endif()
  foreach(folder IN LISTS ARGN)
    set(source ${PROJECT_SOURCE_DIR}/${folder})
    if(NOT IS_DIRECTORY ${source} OR folder MATCHES "(^|/)\\.\\.?(/|$)")
      message(FATAL_ERROR "nvfp4cal_include_folder(${target} ...): '${folder}' is not a folder "
        "of the source tree")
    endif()
    set(root ${PROJECT_BINARY_DIR}/include-roots/${folder})
    set(link ${root}/${folder})
    set(current "")
    if(IS_SYMLINK ${link})
      file(READ_SYMLINK ${link} current)
    endif()
    if(NOT current STREQUAL source)
      get_filename_component(link_parent ${link} DIRECTORY)
      file(MAKE_DIRECTORY ${link_parent})
      # No COPY_ON_ERROR: a copy of the headers would go stale at the first edit.
      file(CREATE_LINK ${source} ${link} RESULT result SYMBOLIC)
      if(NOT result EQUAL 0)
        message(FATAL_ERROR "nvfp4cal_include_folder: cannot link ${link} -> ${source}: "
          "${result} (the build needs a file system with symbolic links)")
      endif()
    endif()
    target_include_directories(${target} ${scope} ${root})
  endforeach()
endfunction()
