package serving

import (
	"context"
	"fmt"
	"os"

	"github.com/kilnml/kiln/serving/repository"
	"github.com/kilnml/kiln/serving/repository/s3repo"
)

// openMirror makes the S3 client and the mirror of an s3:// repository:
// in Config.RepositoryCache when set, else in a new temporary directory
// (returned, to be removed on shutdown).
func openMirror(cfg Config) (*s3repo.Mirror, string, error) {
	loc, err := s3repo.ParseURL(cfg.ModelRepository)
	if err != nil {
		return nil, "", fmt.Errorf("model repository: %w", err)
	}
	client, err := s3repo.NewClient(context.Background(), s3repo.ClientOptions{PathStyle: cfg.S3PathStyle})
	if err != nil {
		return nil, "", fmt.Errorf("model repository %s: %w", loc, err)
	}
	dir, temp := cfg.RepositoryCache, ""
	if dir == "" {
		if dir, err = os.MkdirTemp("", "kiln-s3-cache-"); err != nil {
			return nil, "", fmt.Errorf("model repository %s: cache directory: %w", loc, err)
		}
		temp = dir
	}
	m, err := s3repo.NewMirror(client, loc, dir, s3repo.MirrorOptions{Logger: cfg.Logger})
	if err != nil {
		if temp != "" {
			os.RemoveAll(temp)
		}
		return nil, "", fmt.Errorf("model repository %s: %w", loc, err)
	}
	return m, temp, nil
}

// removeMirrorTemp releases the mirror's cache (its lock) and removes it
// when New made it.
func (s *Server) removeMirrorTemp() {
	if s.mirror != nil {
		s.mirror.Close()
	}
	if s.mirrorTemp != "" {
		os.RemoveAll(s.mirrorTemp)
	}
}

var _ repository.RemoteStatus = (*s3repo.Mirror)(nil)
